//! The TC ingress walk: parse → service? → conntrack → select → NAT →
//! forward. Packets to a frontend are DNATed (and masqueraded where kube-
//! proxy would) to a backend; the backend's replies are translated back so
//! the client only ever sees the address and port it connected to.
//! A backend that is the node's own address is delivered locally (its
//! replies are translated at TC egress); in stack forwarding mode every
//! translated packet goes to the stack and masquerading waits for egress.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{
    CtEntry, CtKind, DropReason, FlowEvent, RawAddr, ServiceValue,
    addr::v4_word,
    cidr_kind,
    conntrack::{CtState, ct_flags, entry_flags},
    proto, svc_flags,
};

use crate::{
    conntrack,
    ctx::PacketCtx,
    forward::{self, Fib},
    icmp,
    nat::{self, Side},
    parse::{self, Fragment, Packet},
    reject, select, snat, stats,
};

const OK: i32 = TC_ACT_OK as i32;

pub fn try_ingress(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(OK);
    };
    if pkt.proto == proto::ICMP {
        return icmp::translate_error(ctx, pkt, icmp::Then::Forward);
    }
    if pkt.proto == proto::ICMPV6 {
        return icmp::translate_error_v6(ctx, pkt, icmp::Then::Forward);
    }
    // Each step is its own BPF function called from here, never from each
    // other: the 512-byte stack limit counts every frame of a call chain.
    if let Some(svc) = select::lookup_service(&pkt)
        && svc.flags & svc_flags::ADDRESS_ONLY == 0
    {
        if pkt.fragment != Fragment::None {
            // Later fragments carry no ports and could not follow this
            // one to the same backend.
            return Err(DropReason::FragmentToService);
        }
        let egress = match to_service(&pkt, &svc)? {
            Flow::Established => 0,
            Flow::New => {
                let egress = new_flow(ctx, &pkt, &svc)?;
                conntrack::mirror_new_flow(&pkt);
                egress
            }
            Flow::NoEndpoints if svc.flags & svc_flags::DROP_IF_EMPTY != 0 => {
                return Err(DropReason::NoBackend);
            }
            Flow::NoEndpoints => {
                // kube-proxy REJECTs traffic to services without endpoints.
                stats::count_drop(DropReason::Rejected);
                return reject::port_unreachable(ctx, &pkt);
            }
        };
        return translate_forward(ctx, &pkt, egress);
    }
    let verdict = reply_from_backend(ctx, &pkt)?;
    if verdict != NOT_A_REPLY {
        return Ok(verdict);
    }
    not_a_frontend(ctx, &pkt)
}

/// What a packet to a frontend is.
pub enum Flow {
    /// Part of a known flow; its forward entry is in the scratch slot.
    Established,
    /// Starts a flow.
    New,
    /// The service has no endpoint to send it to.
    NoEndpoints,
}

/// A packet to no frontend: a cluster IP on a port it does not serve is
/// rejected, an unallocated service address dropped, anything else passes.
#[inline(always)]
fn not_a_frontend(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    if select::is_service_address(&pkt.dst) {
        stats::count_drop(DropReason::Rejected);
        return reject::port_unreachable(ctx, pkt);
    }
    if select::cidr_kind_of(&pkt.dst) == Some(cidr_kind::SERVICE) {
        return Err(DropReason::UnallocatedServiceIp);
    }
    Ok(OK)
}

/// Client → frontend: is the packet part of a known flow of this service?
/// Its forward entry is then copied to the scratch slot.
#[inline(never)]
pub fn to_service(pkt: &Packet, svc: &ServiceValue) -> Result<Flow, DropReason> {
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !select::source_allowed(svc.service_id, &pkt.src) {
        return Err(DropReason::SourceRange);
    }
    let now = conntrack::now_secs();
    if let Some(entry) = conntrack::lookup(&conntrack::key(pkt, CtKind::Forward), now) {
        // SAFETY: pointer from a successful lookup in this run.
        let e = unsafe { &*entry };
        // A flow keeps the backend its entry names (the address is in the
        // entry) even after that backend left the service: like
        // nf_conntrack under kube-proxy, only new flows avoid retired
        // (terminating, removed) endpoints, so rolling updates do not reset
        // live connections. UDP flows to endpoints that stopped serving are
        // cleared by the agent (kube-proxy's CleanStaleEntries). A flow of a
        // service deleted and re-created under the same frontend is new, and
        // so is a connection opened again on the tuple of a closed one.
        if e.service_id == svc.service_id && !reopens_closed_flow(pkt, e) {
            conntrack::touch(entry, pkt, CtKind::Forward, now);
            let scratch = conntrack::scratch().ok_or(DropReason::ConntrackInsert)?;
            // SAFETY: as above.
            *scratch = unsafe { *entry };
            return Ok(Flow::Established);
        }
    }
    Ok(if svc.backend_count == 0 {
        Flow::NoEndpoints
    } else {
        Flow::New
    })
}

/// A connection opened again on the tuple of one that has closed (FIN from
/// both sides or a RST; SCTP: ABORT or SHUTDOWN): a new flow, balanced
/// afresh, as nf_conntrack replaces a closed entry on a new SYN. Without
/// this, a client reusing a source port would reach the old connection's
/// backend — one that may have left the service since.
#[inline(always)]
fn reopens_closed_flow(pkt: &Packet, e: &CtEntry) -> bool {
    pkt.tcp_flags & (ct_flags::SYN | ct_flags::ACK) == ct_flags::SYN
        && matches!(
            CtState::of_entry(pkt.proto, e),
            CtState::TcpClosing | CtState::SctpClosing
        )
}

/// Does this new flow need masquerading? (KUBE-MARK-MASQ's cases.)
#[inline(always)]
fn wants_snat(svc: &ServiceValue, pkt: &Packet, backend: &RawAddr) -> bool {
    svc.flags & svc_flags::SNAT_ALWAYS != 0
        || (svc.flags & svc_flags::SNAT_OUTSIDE_CLUSTER != 0
            && select::cidr_kind_of(&pkt.src) != Some(cidr_kind::CLUSTER))
        // Hairpin: a pod reaching itself through its service.
        || *backend == pkt.src
}

/// Balances a new flow: picks the backend, decides on masquerading, records
/// both conntrack entries; leaves the forward entry in the scratch slot.
/// Returns the egress ifindex already looked up for a masqueraded flow (0: none).
#[inline(never)]
pub fn new_flow(ctx: &impl PacketCtx, pkt: &Packet, svc: &ServiceValue) -> Result<u32, DropReason> {
    if pkt.proto == proto::TCP && pkt.tcp_flags & ct_flags::SYN == 0 {
        stats::count_event(FlowEvent::TcpMidFlowConntrackMiss);
    }
    let now = conntrack::now_secs();
    let hash = select::flow_hash(pkt);
    let (backend_id, backend) = select::pick_backend_for(svc, pkt.src, now, hash)?;
    // A backend of the other family would need NAT46/64: never programmed.
    if v4_word(&backend.addr).is_some() == pkt.v6 {
        return Err(DropReason::Rewrite);
    }
    // Both entries are built in one scratch slot, one after the other.
    let e = conntrack::scratch().ok_or(DropReason::ConntrackInsert)?;

    // Reply entry: the backend's answers go back as coming from the frontend.
    conntrack::init_entry(e, pkt, &pkt.dst, pkt.dport, backend_id, svc.service_id, now);
    let route = if wants_snat(svc, pkt, &backend.addr) {
        masquerade(ctx, pkt, &backend.addr, backend.port)?
    } else {
        0
    };
    let stack = forward::stack_forwarding();
    if route == 0 || stack {
        // Replies addressed to the client itself: not masqueraded, or (in
        // stack mode) masqueraded and given back their destination at
        // ingress, their source at egress.
        let snat = e.flags;
        e.flags &= !entry_flags::SNAT;
        let key = conntrack::key_slot().ok_or(DropReason::ConntrackInsert)?;
        conntrack::set_reply_key(key, &backend.addr, backend.port, &pkt.src, pkt.sport, pkt.proto);
        let inserted = conntrack::insert(key, e);
        e.flags = snat;
        inserted.map_err(|_| DropReason::ConntrackInsert)?;
    }
    // Forward entry: the client's packets go to the backend (masqueraded as
    // the node address and port above, when chosen).
    e.nat_addr = backend.addr;
    e.nat_port = backend.port;
    let key = conntrack::key_slot().ok_or(DropReason::ConntrackInsert)?;
    conntrack::set_key(key, pkt, CtKind::Forward);
    conntrack::insert(key, e).map_err(|_| DropReason::ConntrackInsert)?;
    if stack && route != 0 {
        // Stack mode masquerades at egress, where the packet shows the
        // backend as destination: the same entry under that key.
        let key = conntrack::key_slot().ok_or(DropReason::ConntrackInsert)?;
        let (client, backend) = ((&pkt.src, pkt.sport), (&backend.addr, backend.port));
        conntrack::set_tuple_key(key, client, backend, pkt.proto, CtKind::Snat);
        conntrack::insert(key, e).map_err(|_| DropReason::ConntrackInsert)?;
    }
    Ok(route)
}

/// Masquerades the new flow whose reply entry is in the scratch slot: as
/// the node address the kernel would send from toward the backend, with a
/// port free for this backend (claimed by inserting the reply entry, which
/// also restores the client as destination). Returns the egress ifindex,
/// or 0 when the backend is an address of this node (a host-network
/// endpoint): such packets are delivered locally, which kube-proxy's
/// masquerade (POSTROUTING) never sees, so they are not masqueraded.
/// Its own BPF function: the FIB parameters and the port search need stack
/// of their own.
#[inline(never)]
fn masquerade(ctx: &impl PacketCtx, pkt: &Packet, backend: &RawAddr, backend_port: u16) -> Result<u32, DropReason> {
    let now = conntrack::now_secs();
    let e = conntrack::scratch().ok_or(DropReason::ConntrackInsert)?;
    let route = match forward::lookup(ctx, pkt, &pkt.src, backend, pkt.sport, backend_port, true) {
        Fib::Forward(route) => route,
        Fib::Local => return Ok(0),
        Fib::Unroutable => return Err(DropReason::NoRoute),
    };
    e.flags |= entry_flags::SNAT;
    e.snat_addr = pkt.src;
    e.snat_port = pkt.sport;
    let port = snat::claim_port(backend, backend_port, &route.src, pkt.proto, e, now)?;
    e.snat_addr = route.src;
    e.snat_port = port;
    Ok(route.ifindex)
}

/// DNAT (and SNAT) of a client packet as its forward entry says; forwarded
/// by FIB when translated. `egress`: the interface a new masqueraded flow
/// was routed to (0: look it up).
#[inline(never)]
fn translate_forward(ctx: &TcContext, pkt: &Packet, egress: u32) -> Result<i32, DropReason> {
    let e = conntrack::scratch().ok_or(DropReason::ConntrackInsert)?;
    nat::rewrite(ctx, pkt, Side::Destination, &e.nat_addr, e.nat_port)?;
    stats::count_balanced(e.service_id, e.backend_id, ctx.len());
    if forward::stack_forwarding() {
        // The stack routes it (netfilter FORWARD applies); a masqueraded
        // flow gets its source at TC egress, as a node-address source
        // arriving here would be refused as a martian.
        return Ok(OK);
    }
    let (src, sport) = masquerade_side(ctx, pkt, e, Side::Source, (pkt.src, pkt.sport))?;
    let egress = match egress {
        0 => match forward::lookup(ctx, pkt, &src, &e.nat_addr, sport, e.nat_port, false) {
            Fib::Forward(route) => Some(route.ifindex),
            // A host-network endpoint: up the local stack; its replies
            // get the frontend back at TC egress (see egress.rs).
            Fib::Local => {
                stats::count_event(FlowEvent::LocalEndpoint);
                None
            }
            Fib::Unroutable => None,
        },
        ifindex => Some(ifindex),
    };
    forward::forward(ctx, pkt, egress)
}

/// The masquerade half of a translation: a masqueraded flow's `side`
/// becomes the entry's SNAT address and port (the node's on the way in,
/// the client's on the way back); otherwise it stays `unchanged`.
#[inline(always)]
fn masquerade_side(
    ctx: &TcContext,
    pkt: &Packet,
    e: &lb_common::CtEntry,
    side: Side,
    unchanged: (RawAddr, u16),
) -> Result<(RawAddr, u16), DropReason> {
    if e.flags & entry_flags::SNAT == 0 {
        return Ok(unchanged);
    }
    nat::rewrite(ctx, pkt, side, &e.snat_addr, e.snat_port)?;
    Ok((e.snat_addr, e.snat_port))
}

/// `reply_from_backend`'s answer for a packet that is no reply of ours.
/// Not an `Option`: a `None` returned from a BPF function leaves its payload
/// undefined, and LLVM may fill it from a pointer register, which the
/// verifier refuses.
const NOT_A_REPLY: i32 = i32::MIN;

/// Backend → client: restore the frontend as the source (and the client as
/// the destination of a masqueraded flow). `NOT_A_REPLY`: not a reply of ours.
#[inline(never)]
fn reply_from_backend(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    let now = conntrack::now_secs();
    let Some(entry) = conntrack::lookup(&conntrack::key(pkt, CtKind::Reply), now) else {
        return Ok(NOT_A_REPLY);
    };
    if pkt.fragment != Fragment::None {
        return Err(DropReason::FragmentToService);
    }
    conntrack::touch(entry, pkt, CtKind::Reply, now);
    // SAFETY: pointer from a successful lookup in this run.
    let e = unsafe { *entry };
    if forward::stack_forwarding() {
        // The stack routes the reply as the backend sent it (so netfilter
        // sees the reply of the flow it forwarded); only a masqueraded
        // flow's destination, a node address, goes back to the client
        // first. The frontend becomes the source at TC egress.
        masquerade_side(ctx, pkt, &e, Side::Destination, (pkt.dst, pkt.dport))?;
        return Ok(OK);
    }
    nat::rewrite(ctx, pkt, Side::Source, &e.nat_addr, e.nat_port)?;
    let (client, client_port) = masquerade_side(ctx, pkt, &e, Side::Destination, (pkt.dst, pkt.dport))?;
    // Forwarded by FIB: the restored source may be a node address (NodePort),
    // which the stack would refuse on input.
    let egress = forward::route(ctx, pkt, &e.nat_addr, &client, e.nat_port, client_port, false).map(|r| r.ifindex);
    forward::forward(ctx, pkt, egress)
}
