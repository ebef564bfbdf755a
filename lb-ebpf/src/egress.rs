//! TC egress on the interfaces TC ingress runs on: the translations that
//! can only happen once the node's own stack has handled a packet.
//! - A reply from a host-network endpoint of this node (the API server
//!   behind `kubernetes.default`, a hostNetwork pod behind a NodePort) is
//!   generated locally and never crosses our TC ingress: its source becomes
//!   the frontend again here, on its way out.
//! - In stack forwarding mode, translated packets are routed by the stack
//!   (netfilter FORWARD applies) instead of redirected: a masqueraded
//!   flow's source becomes the node address here (as kube-proxy's
//!   MASQUERADE in POSTROUTING), and backend replies — passed through the
//!   stack untranslated — get the frontend as their source.
//!
//! ICMP errors about translated flows the node sends are translated like
//! the flows' replies.
//!
//! Packets that are not ours cost a parse and one conntrack lookup (two in
//! stack mode) and always pass: egress never drops what it does not know.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{CtKind, DropReason, FlowEvent, conntrack::entry_flags, proto};

use crate::{
    conntrack, forward,
    icmp::{self, Then},
    nat::{self, Side},
    parse::{self, Fragment, Packet},
    stats,
};

const OK: i32 = TC_ACT_OK as i32;

pub fn try_egress(ctx: &TcContext) -> Result<i32, DropReason> {
    // Whatever we cannot parse is not ours to judge here: it passes.
    let Ok(Some(pkt)) = parse::parse(ctx) else {
        return Ok(OK);
    };
    // An error the node sends about a translated flow (a host-network
    // endpoint's port unreachable, a forwarded packet's time exceeded)
    // must show the frontend, as the flow's replies do.
    if pkt.proto == proto::ICMP {
        return icmp::translate_error(ctx, pkt, Then::Pass);
    }
    if pkt.proto == proto::ICMPV6 {
        return icmp::translate_error_v6(ctx, pkt, Then::Pass);
    }
    if pkt.proto != proto::TCP && pkt.proto != proto::UDP {
        return Ok(OK);
    }
    if reply_to_frontend(ctx, pkt)? {
        return Ok(OK);
    }
    if forward::stack_forwarding() {
        masquerade(ctx, pkt)?;
    }
    Ok(OK)
}

/// Backend → client as the backend sent it: the frontend becomes the
/// source. `true`: the packet was a reply of ours.
#[inline(never)]
fn reply_to_frontend(ctx: &TcContext, pkt: &Packet) -> Result<bool, DropReason> {
    let now = conntrack::now_secs();
    let Some(entry) = conntrack::lookup(&conntrack::key(pkt, CtKind::Reply), now) else {
        return Ok(false);
    };
    // SAFETY: pointer from a successful lookup in this run.
    let e = unsafe { *entry };
    // A masqueraded flow's reply is addressed to the node: it is delivered
    // locally, never sent out; nothing to do at egress.
    if e.flags & entry_flags::SNAT != 0 {
        return Ok(true);
    }
    if pkt.fragment != Fragment::None {
        // Later fragments carry no ports: they could not be translated alike.
        return Err(DropReason::FragmentToService);
    }
    conntrack::touch(entry, pkt, CtKind::Reply, now);
    nat::rewrite(ctx, pkt, Side::Source, &e.nat_addr, e.nat_port)?;
    stats::count_event(FlowEvent::EgressReverseNat);
    Ok(true)
}

/// Stack forwarding mode: a masqueraded flow's packet, DNATed at ingress
/// and routed by the stack, gets the node address and port it is
/// masqueraded as (its `CtKind::Snat` entry).
#[inline(never)]
fn masquerade(ctx: &TcContext, pkt: &Packet) -> Result<(), DropReason> {
    let now = conntrack::now_secs();
    let Some(entry) = conntrack::lookup(&conntrack::key(pkt, CtKind::Snat), now) else {
        return Ok(());
    };
    if pkt.fragment != Fragment::None {
        return Err(DropReason::FragmentToService);
    }
    conntrack::touch(entry, pkt, CtKind::Snat, now);
    // SAFETY: pointer from a successful lookup in this run.
    let e = unsafe { *entry };
    nat::rewrite(ctx, pkt, Side::Source, &e.snat_addr, e.snat_port)?;
    stats::count_event(FlowEvent::EgressMasquerade);
    Ok(())
}
