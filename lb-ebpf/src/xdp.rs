//! The XDP fast path on the node's external interfaces (NodePort,
//! LoadBalancer, externalIPs; TCP, UDP and SCTP): the TC path's lookup,
//! conntrack, backend choice and NAT on the same maps, before the kernel
//! builds an skb. The translated frame leaves by XDP_REDIRECT through
//! XDP_EGRESS: back out of the interface it came in on (a backend on another
//! node, or a reply to an external client) or to another device (e.g. a
//! local pod's veth). What it cannot finish goes XDP_PASS, untouched, to the
//! TC path, which stays the reference semantics and finds the conntrack
//! entries made here: ICMP, fragments, other protocols, services without
//! endpoints (REJECT), next hops not resolved yet, egress devices outside
//! XDP_EGRESS, TTL ≤ 1, backends that are the node's own addresses
//! (delivered locally), and every balanced flow in stack forwarding mode.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::programs::XdpContext;
use lb_common::{CtKind, DropReason, FlowEvent, conntrack::entry_flags, proto, svc_flags};

use crate::{
    conntrack,
    ctx::PacketCtx,
    forward,
    ingress::{self, Flow},
    maps::XDP_EGRESS,
    nat::{self, Tuple},
    parse::{self, Fragment, Packet, ptr_at},
    select, stats,
};

pub fn try_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(XDP_PASS);
    };
    // Long IPv6 extension header chains are TC's (see MAX_XDP_L4_OFF_V6).
    if pkt.proto == proto::ICMP
        || pkt.proto == proto::ICMPV6
        || pkt.fragment != Fragment::None
        || (pkt.v6 && pkt.l4_off > nat::MAX_XDP_L4_OFF_V6)
    {
        return Ok(XDP_PASS);
    }
    if let Some(svc) = select::lookup_service(&pkt)
        && svc.flags & svc_flags::ADDRESS_ONLY == 0
    {
        match ingress::to_service(&pkt, &svc)? {
            Flow::Established => {}
            Flow::New => {
                ingress::new_flow(ctx, &pkt, &svc)?;
                conntrack::mirror_new_flow(&pkt);
            }
            Flow::NoEndpoints => return Ok(passed_to_stack()),
        }
        return Ok(to_backend(ctx, &pkt));
    }
    Ok(from_backend(ctx, &pkt))
}

/// The final steps run as BPF functions of their own (stack) and return
/// a bare action: a `Result` would come back through caller stack memory,
/// which the verifier refuses.
#[inline(always)]
fn verdict(result: Result<u32, DropReason>) -> u32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            stats::count_drop(reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn passed_to_stack() -> u32 {
    stats::count_event(FlowEvent::XdpPassedToStack);
    XDP_PASS
}

/// Client → backend, as the forward entry in the scratch slot says.
#[inline(never)]
fn to_backend(ctx: &XdpContext, pkt: &Packet) -> u32 {
    verdict(try_to_backend(ctx, pkt))
}

#[inline(always)]
fn try_to_backend(ctx: &XdpContext, pkt: &Packet) -> Result<u32, DropReason> {
    let e = conntrack::scratch().ok_or(DropReason::ConntrackInsert)?;
    let (src, sport) = if e.flags & entry_flags::SNAT != 0 {
        (e.snat_addr, e.snat_port)
    } else {
        (pkt.src, pkt.sport)
    };
    let to = Tuple {
        src,
        dst: e.nat_addr,
        sport,
        dport: e.nat_port,
    };
    let (service_id, backend_id) = (e.service_id, e.backend_id);
    let verdict = send(ctx, pkt, &to)?;
    if verdict != XDP_PASS {
        stats::count_balanced(service_id, backend_id, PacketCtx::len(ctx));
    }
    Ok(verdict)
}

/// Backend → client (a backend on another node answering through this
/// one): the frontend becomes the source again. Not a reply of ours: pass.
#[inline(never)]
fn from_backend(ctx: &XdpContext, pkt: &Packet) -> u32 {
    verdict(try_from_backend(ctx, pkt))
}

#[inline(always)]
fn try_from_backend(ctx: &XdpContext, pkt: &Packet) -> Result<u32, DropReason> {
    let now = conntrack::now_secs();
    // A miss goes to TC, which also looks in a previous table.
    let Some(entry) = conntrack::lookup_current(&conntrack::key(pkt, CtKind::Reply), now) else {
        return Ok(XDP_PASS);
    };
    conntrack::touch(entry, pkt, CtKind::Reply, now);
    // SAFETY: pointer from a successful lookup in this run.
    let e = unsafe { &*entry };
    let (dst, dport) = if e.flags & entry_flags::SNAT != 0 {
        (e.snat_addr, e.snat_port)
    } else {
        (pkt.dst, pkt.dport)
    };
    let to = Tuple {
        src: e.nat_addr,
        dst,
        sport: e.nat_port,
        dport,
    };
    send(ctx, pkt, &to)
}

/// Translates the frame to `to` and sends it to the FIB's next hop — when
/// XDP can: otherwise the frame is passed to TC untouched.
#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, to: &Tuple) -> Result<u32, DropReason> {
    // Stack forwarding mode: the stack must route (netfilter FORWARD) what
    // XDP would send past it.
    if pkt.ttl <= 1 || forward::stack_forwarding() {
        return Ok(passed_to_stack());
    }
    let Some(route) = forward::route(ctx, pkt, &to.src, &to.dst, to.sport, to.dport, false) else {
        return Ok(passed_to_stack());
    };
    if !route.resolved || XDP_EGRESS.get(route.ifindex).is_none() {
        return Ok(passed_to_stack());
    }
    nat::rewrite_frame(ctx, pkt, to)?;
    let dmac = ptr_at::<[u8; 6]>(ctx, 0)? as *mut [u8; 6];
    let smac = ptr_at::<[u8; 6]>(ctx, 6)? as *mut [u8; 6];
    // SAFETY: bounds checked by ptr_at; byte arrays, no alignment.
    unsafe {
        dmac.write_unaligned(route.dmac);
        smac.write_unaligned(route.smac);
    }
    stats::count_event(FlowEvent::XdpForwarded);
    // Also back out of the ingress device by redirect rather than XDP_TX:
    // a veth flushes XDP_TX frames to its peer only when the peer runs an
    // XDP program, while the devmap redirect works wherever the device
    // takes XDP frames at all, and is bulked like XDP_TX. The entry was
    // present a moment ago; gone now only if the agent just removed it.
    XDP_EGRESS.redirect(route.ifindex, 0).map_err(|_| DropReason::NoRoute)
}
