//! The TC ingress walk: parse → service? → conntrack → select → NAT.
//! Packets to a service are DNATed to a backend; the backend's replies are
//! translated back so the client only ever sees VIP:port.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{
    CtKind, DropReason, RawAddr, ServiceValue,
    addr::{from_v4_word, v4_word},
};

use crate::{
    conntrack,
    nat::{self, Side},
    parse::{self, Fragment, Packet},
    select, stats,
};

pub fn try_ingress(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    match select::lookup_service(&pkt) {
        Some(svc) => {
            if pkt.fragment != Fragment::None {
                // Later fragments carry no ports and could not follow this
                // one to the same backend.
                return Err(DropReason::FragmentToService);
            }
            to_service(ctx, &pkt, &svc)
        }
        None => reply_from_backend(ctx, &pkt),
    }
}

/// Client → VIP: keep an existing flow on its backend, or balance a new one.
#[inline(always)]
fn to_service(ctx: &TcContext, pkt: &Packet, svc: &ServiceValue) -> Result<i32, DropReason> {
    let now = conntrack::now_secs();
    let fwd_key = conntrack::key(pkt, CtKind::Forward);
    if let Some(entry) = conntrack::lookup(&fwd_key, now) {
        // SAFETY: pointer from a successful lookup in this run.
        let e = unsafe { *entry };
        // The flow stays on its backend while that backend still belongs to
        // this service with the same address; otherwise it is balanced anew.
        if e.service_id == svc.service_id
            && let Some(b) = select::live_backend(e.backend_id, e.service_id)
            && b.addr == e.nat_addr
            && b.port == e.nat_port
        {
            conntrack::touch(entry, pkt, now);
            return dnat(ctx, pkt, e.service_id, e.backend_id, &e.nat_addr, e.nat_port);
        }
    }

    let (backend_id, backend) = select::pick_backend_for(svc, from_v4_word(pkt.src), now)?;
    let fwd = conntrack::new_entry(pkt, backend.addr, backend.port, backend_id, svc.service_id, now);
    let rev = conntrack::new_entry(pkt, from_v4_word(pkt.dst), pkt.dport, backend_id, svc.service_id, now);
    conntrack::insert(&conntrack::reply_key(pkt, backend.addr, backend.port), &rev)
        .map_err(|_| DropReason::ConntrackInsert)?;
    conntrack::insert(&fwd_key, &fwd).map_err(|_| DropReason::ConntrackInsert)?;
    dnat(ctx, pkt, svc.service_id, backend_id, &backend.addr, backend.port)
}

#[inline(always)]
fn dnat(
    ctx: &TcContext,
    pkt: &Packet,
    service_id: u32,
    backend_id: u32,
    addr: &RawAddr,
    port: u16,
) -> Result<i32, DropReason> {
    // An IPv6 backend behind an IPv4 VIP would need NAT46: never programmed.
    let addr = v4_word(addr).ok_or(DropReason::Rewrite)?;
    nat::rewrite(ctx, pkt, Side::Destination, addr, port)?;
    stats::count_balanced(service_id, backend_id, ctx.len());
    Ok(TC_ACT_OK)
}

/// Backend → client: restore VIP:port as the source. Anything else passes.
#[inline(always)]
fn reply_from_backend(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    let now = conntrack::now_secs();
    let Some(entry) = conntrack::lookup(&conntrack::key(pkt, CtKind::Reply), now) else {
        return Ok(TC_ACT_OK);
    };
    if pkt.fragment != Fragment::None {
        return Err(DropReason::FragmentToService);
    }
    conntrack::touch(entry, pkt, now);
    // SAFETY: pointer from a successful lookup in this run.
    let (vip, vport) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    let vip = v4_word(&vip).ok_or(DropReason::Rewrite)?;
    nat::rewrite(ctx, pkt, Side::Source, vip, vport)?;
    Ok(TC_ACT_OK)
}
