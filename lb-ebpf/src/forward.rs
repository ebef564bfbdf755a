//! Forwarding after NAT: a FIB lookup and `bpf_redirect_neigh` straight out
//! of the egress interface, as a router would (TTL decremented). Packets
//! whose source became a node address (masquerade, or a reply restored to
//! come from a node's NodePort) would be refused by the stack as martians,
//! so NATed packets take this path; what the FIB cannot forward (local
//! delivery to a host-network endpoint, no route) is left to the stack.
//! In stack forwarding mode the stack routes every translated packet
//! (see `stack_forwarding`).

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, TC_ACT_OK,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::{
    DropReason, RawAddr,
    addr::{from_v4_word, v4_word},
    sock::config_flags,
};

use crate::{
    ctx::PacketCtx,
    maps::CONFIG,
    parse::{IP_CSUM_OFF, IP_TTL_OFF, IP6_HOP_LIMIT_OFF, Packet},
};

/// Stack forwarding mode (`--forwarding-mode stack`)? Translated packets
/// then go up the stack (netfilter FORWARD sees them) rather than being
/// redirected, and masquerading happens at TC egress (egress.rs).
#[inline(always)]
pub fn stack_forwarding() -> bool {
    CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flags::STACK_FORWARDING != 0)
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// An address as the FIB's four IPv6 words (as in the packet).
#[inline(always)]
fn words(a: &RawAddr) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

#[inline(always)]
fn from_words(w: [u32; 4]) -> RawAddr {
    let mut a = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        a[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    a
}

/// Where the FIB sends a packet: the egress interface and, when asked,
/// the node address the kernel would use as source toward it; with the
/// next hop's MAC when the neighbour is resolved (what XDP needs).
#[derive(Clone, Copy)]
pub struct Route {
    pub ifindex: u32,
    pub src: RawAddr,
    /// Ethernet source and destination of the next hop, valid when `resolved`.
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub resolved: bool,
}

/// What the FIB says about a destination.
pub enum Fib {
    /// Forwarded out of an interface.
    Forward(Route),
    /// One of the node's own addresses (or broadcast): delivered locally,
    /// never forwarded — a host-network endpoint.
    Local,
    /// Blackhole, unreachable, no route, forwarding off.
    Unroutable,
}

/// FIB lookup for a packet from `src`:`sport` to `dst`:`dport` (ports in
/// host order). `None`: not forwardable (local, blackhole, no route).
#[inline(always)]
pub fn route(
    ctx: &impl PacketCtx,
    pkt: &Packet,
    src: &RawAddr,
    dst: &RawAddr,
    sport: u16,
    dport: u16,
    want_src: bool,
) -> Option<Route> {
    match lookup(ctx, pkt, src, dst, sport, dport, want_src) {
        Fib::Forward(route) => Some(route),
        Fib::Local | Fib::Unroutable => None,
    }
}

/// The FIB's answer for a packet from `src`:`sport` to `dst`:`dport`
/// (ports in host order), with the source address when `want_src`.
#[inline(always)]
pub fn lookup(
    ctx: &impl PacketCtx,
    pkt: &Packet,
    src: &RawAddr,
    dst: &RawAddr,
    sport: u16,
    dport: u16,
    want_src: bool,
) -> Fib {
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.l4_protocol = pkt.proto;
    p.sport = sport.to_be();
    p.dport = dport.to_be();
    p.__bindgen_anon_1.tot_len = pkt.tot_len;
    if pkt.v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = words(src);
        p.__bindgen_anon_4.ipv6_dst = words(dst);
    } else {
        p.family = AF_INET;
        let (Some(src), Some(dst)) = (v4_word(src), v4_word(dst)) else {
            return Fib::Unroutable;
        };
        p.__bindgen_anon_3.ipv4_src = src;
        p.__bindgen_anon_4.ipv4_dst = dst;
    }
    p.ifindex = ctx.ingress_ifindex();
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: params on our stack, size given.
    let ret = unsafe { bpf_fib_lookup(ctx.raw(), &mut p, core::mem::size_of::<FibParams>() as i32, flags) };
    if ret == BPF_FIB_LKUP_RET_NOT_FWDED as i64 {
        return Fib::Local;
    }
    if ret != BPF_FIB_LKUP_RET_SUCCESS as i64 && ret != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Fib::Unroutable;
    }
    // SAFETY: union field written by the helper.
    Fib::Forward(Route {
        ifindex: p.ifindex,
        src: if pkt.v6 {
            from_words(unsafe { p.__bindgen_anon_3.ipv6_src })
        } else {
            from_v4_word(unsafe { p.__bindgen_anon_3.ipv4_src })
        },
        smac: p.smac,
        dmac: p.dmac,
        resolved: ret == BPF_FIB_LKUP_RET_SUCCESS as i64,
    })
}

/// Sends the (rewritten) packet out of `route`'s interface, resolving the
/// next hop's MAC; without a route, or with TTL about to expire, the stack
/// handles it (and sends any ICMP error).
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, egress: Option<u32>) -> Result<i32, DropReason> {
    let Some(ifindex) = egress else {
        return Ok(TC_ACT_OK as i32);
    };
    if pkt.ttl <= 1 {
        return Ok(TC_ACT_OK as i32);
    }
    if pkt.v6 {
        // No header checksum in IPv6.
        ctx.store(IP6_HOP_LIMIT_OFF, &(pkt.ttl - 1), 0)
            .map_err(|_| DropReason::Rewrite)?;
        return Ok(redirect(ifindex));
    }
    // TTL and protocol share one 16-bit checksum word.
    let old = u16::from_be_bytes([pkt.ttl, pkt.proto]).to_be();
    let new = u16::from_be_bytes([pkt.ttl - 1, pkt.proto]).to_be();
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 2)
        .map_err(|_| DropReason::Rewrite)?;
    ctx.store(IP_TTL_OFF, &(pkt.ttl - 1), 0)
        .map_err(|_| DropReason::Rewrite)?;
    Ok(redirect(ifindex))
}

#[inline(always)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; no neighbour params: the kernel looks the
    // next hop up itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
