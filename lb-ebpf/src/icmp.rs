//! ICMP errors about NATed flows (fragmentation needed, port unreachable,
//! time exceeded, ...) are translated back like the flow's replies: the
//! quoted packet shows the frontend (and the client, when masqueraded)
//! again, so PMTU discovery and error reporting work through a Service.
//! Other ICMP passes untouched.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use lb_common::{
    CtKey, CtKind, DropReason, RawAddr,
    addr::{from_v4_word, v4_word},
    conntrack::entry_flags,
    proto,
};

use crate::{
    conntrack, forward, nat,
    parse::{ETH_HDR_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF, Packet, ptr_at},
};

const OK: i32 = TC_ACT_OK as i32;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HDR_LEN: usize = 8;

/// The start of a quoted IPv4 header.
#[repr(C)]
struct InnerIp {
    version_ihl: u8,
    _tos: u8,
    _tot_len: u16,
    _id: u16,
    _frag_off: u16,
    _ttl: u8,
    protocol: u8,
    _check: u16,
    saddr: u32,
    daddr: u32,
}

/// Protocols of the flows we translate: their quoted header starts with
/// the ports. (A quoted SCTP CRC32c is left as it was: nobody checks a
/// quote's checksum.)
#[inline(always)]
fn quotes_ports(inner_proto: u8) -> bool {
    inner_proto == proto::TCP || inner_proto == proto::UDP || inner_proto == proto::SCTP
}

#[inline(always)]
fn replace(ctx: &TcContext, off: usize, csum_offs: (usize, usize), old: u32, new: u32) -> Result<(), DropReason> {
    // The 4 bytes at `off` change: fix the IP header checksum that covers
    // them (inner or outer) and the ICMP checksum over the message.
    let (ip_csum, icmp_csum) = csum_offs;
    ctx.l3_csum_replace(ip_csum, old as u64, new as u64, 4)
        .map_err(|_| DropReason::Rewrite)?;
    if icmp_csum != 0 {
        ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 4)
            .map_err(|_| DropReason::Rewrite)?;
    }
    ctx.store(off, &new, 0).map_err(|_| DropReason::Rewrite)
}

#[inline(always)]
fn replace_port(ctx: &TcContext, off: usize, icmp_csum: usize, old: u16, new: u16) -> Result<(), DropReason> {
    let (old, new) = (old.to_be(), new.to_be());
    if old != new {
        ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 2)
            .map_err(|_| DropReason::Rewrite)?;
        ctx.store(off, &new, 0).map_err(|_| DropReason::Rewrite)?;
    }
    Ok(())
}

/// Where a translated error goes next.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Forwarded by FIB (TC ingress).
    Forward,
    /// On its way already (TC egress: the stack routed it, e.g. an error
    /// the node itself sends about a flow to a host-network endpoint).
    Pass,
}

/// An ICMP error quoting a packet of a flow we translate: rewrite it as the
/// client must see it and forward it (`then`). Anything else: `OK` (pass).
#[inline(never)]
pub fn translate_error(ctx: &TcContext, pkt: &Packet, then: Then) -> Result<i32, DropReason> {
    let (Some(outer_src), Some(outer_dst)) = (v4_word(&pkt.src), v4_word(&pkt.dst)) else {
        return Ok(OK);
    };
    let icmp_type = (pkt.sport >> 8) as u8;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_PARAMETER_PROBLEM {
        return Ok(OK);
    }
    // Bounded for the verifier (this is its own BPF function: the value
    // arrives through memory).
    let l4_off = pkt.l4_off;
    if l4_off > ETH_HDR_LEN + 60 {
        return Ok(OK);
    }
    let inner_off = l4_off + ICMP_HDR_LEN;
    let Ok(inner) = ptr_at::<InnerIp>(ctx, inner_off) else {
        return Ok(OK);
    };
    // SAFETY: bounds checked by ptr_at; unaligned-safe reads.
    let (version_ihl, inner_proto, inner_src, inner_dst) = unsafe {
        (
            (*inner).version_ihl,
            (*inner).protocol,
            core::ptr::addr_of!((*inner).saddr).read_unaligned(),
            core::ptr::addr_of!((*inner).daddr).read_unaligned(),
        )
    };
    let inner_ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || inner_ihl < 5 || !quotes_ports(inner_proto) {
        return Ok(OK);
    }
    let inner_l4 = inner_off + inner_ihl * 4;
    let Ok(ports) = ptr_at::<[u16; 2]>(ctx, inner_l4) else {
        return Ok(OK);
    };
    // SAFETY: bounds checked by ptr_at.
    let (inner_sport, inner_dport) = unsafe { (u16::from_be((*ports)[0]), u16::from_be((*ports)[1])) };

    // The quoted packet went from client (or node, masqueraded) to backend:
    // its flow's reply entry is keyed backend → client.
    let key = CtKey {
        src_addr: from_v4_word(inner_dst),
        dst_addr: from_v4_word(inner_src),
        src_port: inner_dport,
        dst_port: inner_sport,
        proto: inner_proto,
        kind: CtKind::Reply as u8,
        _pad: [0; 2],
    };
    let now = conntrack::now_secs();
    let Some(entry) = conntrack::lookup(&key, now) else {
        return Ok(OK);
    };
    // SAFETY: pointer from a successful lookup in this run.
    let e = unsafe { *entry };
    let frontend = v4_word(&e.nat_addr).ok_or(DropReason::Rewrite)?;
    let masq = e.flags & entry_flags::SNAT != 0;
    let client = if masq {
        v4_word(&e.snat_addr).ok_or(DropReason::Rewrite)?
    } else {
        inner_src
    };

    let icmp_csum = l4_off + 2;
    let inner_csum = inner_off + 10;
    // Inner header: destination backend → frontend, source node → client.
    let csum_before: u16 = ctx.load(inner_csum).map_err(|_| DropReason::Truncated)?;
    replace(ctx, inner_off + 16, (inner_csum, 0), inner_dst, frontend)?;
    if masq {
        replace(ctx, inner_off + 12, (inner_csum, 0), inner_src, client)?;
    }
    let csum_after: u16 = ctx.load(inner_csum).map_err(|_| DropReason::Truncated)?;
    // The ICMP checksum covers the quoted bytes: addresses and their checksum.
    ctx.l4_csum_replace(icmp_csum, inner_dst as u64, frontend as u64, 4)
        .map_err(|_| DropReason::Rewrite)?;
    if masq {
        ctx.l4_csum_replace(icmp_csum, inner_src as u64, client as u64, 4)
            .map_err(|_| DropReason::Rewrite)?;
    }
    ctx.l4_csum_replace(icmp_csum, csum_before as u64, csum_after as u64, 2)
        .map_err(|_| DropReason::Rewrite)?;
    replace_port(ctx, inner_l4 + 2, icmp_csum, inner_dport, e.nat_port)?;
    if masq {
        replace_port(ctx, inner_l4, icmp_csum, inner_sport, e.snat_port)?;
    }

    // Outer header: an error from the backend itself comes from the
    // frontend; one for a masqueraded flow goes to the client.
    if outer_src == inner_dst {
        replace(ctx, IP_SRC_OFF, (IP_CSUM_OFF, 0), outer_src, frontend)?;
    }
    if masq && outer_dst != client {
        replace(ctx, IP_DST_OFF, (IP_CSUM_OFF, 0), outer_dst, client)?;
    }
    if then == Then::Pass {
        return Ok(OK);
    }
    let egress =
        forward::route(ctx, pkt, &from_v4_word(frontend), &from_v4_word(client), 0, 0, false).map(|r| r.ifindex);
    forward::forward(ctx, pkt, egress)
}

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAMETER_PROBLEM: u8 = 4;
const IP6_HDR_LEN: usize = 40;
/// Largest outer L4 offset handled (extension headers on an error are rare).
const MAX_ICMP6_OFF: usize = ETH_HDR_LEN + IP6_HDR_LEN + 64;

/// `replace_v6`'s flag (in its checksum offset argument): the bytes are in
/// the ICMPv6 pseudo-header (the outer addresses).
const PSEUDO: u32 = 1 << 31;

/// Replaces the 16 bytes at `off` with `new` (`old` before) and updates the
/// ICMPv6 checksum at `csum_at` (& !PSEUDO). Its own BPF function, called
/// up to four times. 0: done; otherwise a failure.
#[inline(never)]
fn replace_v6(ctx: &TcContext, off: u32, csum_at: u32, old: &RawAddr, new: &RawAddr) -> i64 {
    if old == new {
        return 0;
    }
    let flags = if csum_at & PSEUDO != 0 {
        BPF_F_PSEUDO_HDR as u64
    } else {
        0
    };
    let csum_off = (csum_at & !PSEUDO) as usize;
    match nat::rewrite_v6_addr(ctx, csum_off, off as usize, old, new, flags) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

#[inline(always)]
fn replaced_v6(ctx: &TcContext, off: usize, csum_at: u32, old: &RawAddr, new: &RawAddr) -> Result<(), DropReason> {
    match replace_v6(ctx, off as u32, csum_at, old, new) {
        0 => Ok(()),
        _ => Err(DropReason::Rewrite),
    }
}

/// ICMPv6 errors (destination unreachable, packet too big, time exceeded,
/// parameter problem) quoting a packet of a flow we translate: rewritten as
/// the client must see them, like IPv4's. NDP, echo and the rest: `OK`.
#[inline(never)]
pub fn translate_error_v6(ctx: &TcContext, pkt: &Packet, then: Then) -> Result<i32, DropReason> {
    let icmp_type = (pkt.sport >> 8) as u8;
    if !matches!(
        icmp_type,
        ICMP6_DEST_UNREACH | ICMP6_PACKET_TOO_BIG | ICMP6_TIME_EXCEEDED | ICMP6_PARAMETER_PROBLEM
    ) {
        return Ok(OK);
    }
    // Bounded for the verifier (the value arrives through memory).
    let l4_off = pkt.l4_off;
    if l4_off > MAX_ICMP6_OFF {
        return Ok(OK);
    }
    let inner_off = l4_off + ICMP_HDR_LEN;
    let Ok(inner) = ptr_at::<[u8; 8]>(ctx, inner_off) else {
        return Ok(OK);
    };
    // SAFETY: bounds checked by ptr_at.
    let (version, inner_proto) = unsafe { ((*inner)[0] >> 4, (*inner)[6]) };
    if version != 6 || !quotes_ports(inner_proto) {
        return Ok(OK);
    }
    let inner_l4 = inner_off + IP6_HDR_LEN;
    // The quoted packet went from client (or node, masqueraded) to backend:
    // its flow's reply entry is keyed backend → client. Built in the key
    // slot, whose fields then also serve as the quoted addresses.
    let key = conntrack::key_slot().ok_or(DropReason::ConntrackInsert)?;
    let (Ok(src), Ok(dst), Ok(ports)) = (
        ctx.load::<RawAddr>(inner_off + 8),
        ctx.load::<RawAddr>(inner_off + 24),
        ctx.load::<[u16; 2]>(inner_l4),
    ) else {
        return Ok(OK);
    };
    key.src_addr = dst;
    key.dst_addr = src;
    let (inner_sport, inner_dport) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
    key.src_port = inner_dport;
    key.dst_port = inner_sport;
    key.proto = inner_proto;
    key.kind = CtKind::Reply as u8;
    key._pad = [0; 2];
    let now = conntrack::now_secs();
    let Some(entry) = conntrack::lookup(key, now) else {
        return Ok(OK);
    };
    // SAFETY: pointer from a successful lookup in this run.
    let e = unsafe { &*entry };
    let masq = e.flags & entry_flags::SNAT != 0;
    let icmp_csum = (l4_off + 2) as u32;
    // Inner packet: destination backend → frontend, source node → client.
    replaced_v6(ctx, inner_off + 24, icmp_csum, &key.src_addr, &e.nat_addr)?;
    replace_port(ctx, inner_l4 + 2, icmp_csum as usize, inner_dport, e.nat_port)?;
    if masq {
        replaced_v6(ctx, inner_off + 8, icmp_csum, &key.dst_addr, &e.snat_addr)?;
        replace_port(ctx, inner_l4, icmp_csum as usize, inner_sport, e.snat_port)?;
    }
    // Outer header: an error from the backend itself comes from the
    // frontend; one for a masqueraded flow goes to the client.
    let from_backend = pkt.src == key.src_addr;
    if from_backend {
        replaced_v6(ctx, IP6_SRC_OFF, icmp_csum | PSEUDO, &pkt.src, &e.nat_addr)?;
    }
    if masq {
        replaced_v6(ctx, IP6_DST_OFF, icmp_csum | PSEUDO, &pkt.dst, &e.snat_addr)?;
    }
    if then == Then::Pass {
        return Ok(OK);
    }
    let src = if from_backend { &e.nat_addr } else { &pkt.src };
    let dst = if masq { &e.snat_addr } else { &pkt.dst };
    let egress = forward::route(ctx, pkt, src, dst, 0, 0, false).map(|r| r.ifindex);
    forward::forward(ctx, pkt, egress)
}
