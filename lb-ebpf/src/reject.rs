//! kube-proxy's REJECT for services without endpoints: the packet is turned
//! into an ICMP port unreachable for its sender, in place, and sent back out
//! of the interface it came in on. TCP clients see "connection refused" at
//! once, UDP and SCTP clients an error, instead of a timeout.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{DropReason, proto};

use crate::parse::{ETH_HDR_LEN, Packet, ptr_at};

const ICMP_HDR_LEN: usize = 8;
const NEW_IP_HDR_LEN: usize = 20;
/// How much of the original L4 header the ICMP body quotes: at least the 8
/// bytes RFC 792 asks for, and up to the L4 checksum field, which a
/// checksum-offloaded (CHECKSUM_PARTIAL) skb may not be cut before.
const QUOTED_UDP: usize = 8;
const QUOTED_TCP: usize = 20;
/// SCTP: the common header, verification tag and CRC32c included (the
/// sender checks the tag, RFC 9260 appendix C).
const QUOTED_SCTP: usize = 12;
/// ICMP type 3 (destination unreachable), code 3 (port unreachable).
const ICMP_PORT_UNREACHABLE: [u8; 2] = [3, 3];

/// One's-complement sum of big-endian 16-bit words, folded (not inverted).
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Turns the packet into the frame of an ICMP answer: keeps its first `keep`
/// bytes (Ethernet, the original IP header, the quoted L4 bytes), opens room
/// for a new IP header of `ip_hdr_len` and the ICMP header between Ethernet
/// and the old IP header, and addresses the Ethernet header back to where
/// the packet came from (`macs`: its destination then source MAC).
#[inline(always)]
fn reframe(ctx: &TcContext, macs: &[u8; 12], keep: usize, ip_hdr_len: usize, ethertype: u16) -> Result<(), DropReason> {
    // SAFETY: helper calls on our own context; no packet pointer is held.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, keep as u32, 0) != 0 {
            return Err(DropReason::Rewrite);
        }
        if bpf_skb_adjust_room(ctx.skb.skb, (ip_hdr_len + ICMP_HDR_LEN) as i32, BPF_ADJ_ROOM_MAC, 0) != 0 {
            return Err(DropReason::Rewrite);
        }
    }
    let mut eth = [0u8; 14];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12..].copy_from_slice(&ethertype.to_be_bytes());
    ctx.store(0, &eth, 0).map_err(|_| DropReason::Rewrite)
}

/// Rewrites `pkt` into ICMP destination unreachable / port unreachable from
/// its destination to its source; returns the redirect verdict.
#[inline(never)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    match (pkt.v6, pkt.proto) {
        (true, proto::TCP) => port_unreachable_v6::<QUOTED_TCP>(ctx, pkt),
        (true, proto::SCTP) => port_unreachable_v6::<QUOTED_SCTP>(ctx, pkt),
        (true, _) => port_unreachable_v6::<QUOTED_UDP>(ctx, pkt),
        (false, proto::TCP) => port_unreachable_quoting::<QUOTED_TCP>(ctx, pkt),
        (false, proto::SCTP) => port_unreachable_quoting::<QUOTED_SCTP>(ctx, pkt),
        (false, _) => port_unreachable_quoting::<QUOTED_UDP>(ctx, pkt),
    }
}

#[inline(never)]
fn port_unreachable_quoting<const QUOTED_L4: usize>(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    let ip_len = pkt.l4_off - ETH_HDR_LEN;
    // Fixed-size loads (the verifier wants constant lengths).
    let macs: [u8; 12] = ctx.load(0).map_err(|_| DropReason::Truncated)?;
    let quoted: [u8; QUOTED_L4] = ctx.load(pkt.l4_off).map_err(|_| DropReason::Truncated)?;

    reframe(ctx, &macs, pkt.l4_off + QUOTED_L4, NEW_IP_HDR_LEN, 0x0800)?;

    // New IPv4 header: from the address the client tried, to the client.
    let tot_len = (NEW_IP_HDR_LEN + ICMP_HDR_LEN + ip_len + QUOTED_L4) as u16;
    let mut ip = [0u8; NEW_IP_HDR_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 1; // ICMP
    ip[12..16].copy_from_slice(&pkt.dst[12..16]);
    ip[16..20].copy_from_slice(&pkt.src[12..16]);
    let ip_csum = !fold(sum_words(&ip));
    ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    ctx.store(ETH_HDR_LEN, &ip, 0).map_err(|_| DropReason::Rewrite)?;

    // ICMP checksum over header + quoted datagram. The quoted IP header
    // carries a valid checksum, so its words sum to 0xffff (zero in one's
    // complement) and drop out: only the ICMP header and the quoted L4
    // bytes count.
    let icmp_sum = sum_words(&ICMP_PORT_UNREACHABLE) + sum_words(&quoted);
    let icmp_csum = !fold(icmp_sum);
    let mut icmp = [0u8; ICMP_HDR_LEN];
    icmp[..2].copy_from_slice(&ICMP_PORT_UNREACHABLE);
    icmp[2..4].copy_from_slice(&icmp_csum.to_be_bytes());
    ctx.store(ETH_HDR_LEN + NEW_IP_HDR_LEN, &icmp, 0)
        .map_err(|_| DropReason::Rewrite)?;

    // SAFETY: reading the context's own field; plain helper call.
    let ret = unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) };
    Ok(ret as i32)
}

/// ICMPv6 destination unreachable, code 4 (port unreachable).
const ICMP6_PORT_UNREACHABLE: [u8; 2] = [1, 4];
const IP6_HDR_LEN: usize = 40;
const NEXT_HEADER_ICMPV6: u8 = 58;

/// The IPv6 REJECT: ICMPv6 port unreachable quoting the IPv6 header and
/// the first L4 bytes. A packet with extension headers is dropped instead
/// (still counted as rejected by the caller): its quote has no fixed length.
#[inline(never)]
fn port_unreachable_v6<const QUOTED_L4: usize>(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    if pkt.l4_off != ETH_HDR_LEN + IP6_HDR_LEN {
        return Ok(TC_ACT_SHOT as i32);
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| DropReason::Truncated)?;
    // The bytes the message quotes (IPv6 header and the first L4 bytes),
    // summed in place before the packet changes. All sums below are of
    // native-order words, as bpf_csum_diff's; so is the stored result.
    let quoted = ptr_at::<[u8; 40]>(ctx, ETH_HDR_LEN)?;
    let _ = ptr_at::<[u8; QUOTED_L4]>(ctx, ETH_HDR_LEN + IP6_HDR_LEN)?;
    // SAFETY: both bounds checked by ptr_at just above; read-only.
    let quoted_sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quoted as *mut u32,
            (IP6_HDR_LEN + QUOTED_L4) as u32,
            0,
        )
    };
    if quoted_sum < 0 {
        return Err(DropReason::Rewrite);
    }
    reframe(ctx, &macs, ETH_HDR_LEN + IP6_HDR_LEN + QUOTED_L4, IP6_HDR_LEN, 0x86dd)?;

    // New IPv6 header: from the address the client tried, to the client.
    let payload_len = (ICMP_HDR_LEN + IP6_HDR_LEN + QUOTED_L4) as u16;
    let mut hdr = [0u8; IP6_HDR_LEN];
    hdr[0] = 0x60;
    hdr[4..6].copy_from_slice(&payload_len.to_be_bytes());
    hdr[6] = NEXT_HEADER_ICMPV6;
    hdr[7] = 64; // hop limit
    hdr[8..24].copy_from_slice(&pkt.dst);
    hdr[24..40].copy_from_slice(&pkt.src);
    ctx.store(ETH_HDR_LEN, &hdr, 0).map_err(|_| DropReason::Rewrite)?;

    // ICMPv6 checksum: pseudo-header (addresses, length, next header) +
    // the ICMPv6 header + the quoted bytes.
    let mut sum = (quoted_sum as u32) as u64
        + native_words(&pkt.src)
        + native_words(&pkt.dst)
        + u16::from_ne_bytes(payload_len.to_be_bytes()) as u64
        + u16::from_ne_bytes([0, NEXT_HEADER_ICMPV6]) as u64
        + u16::from_ne_bytes(ICMP6_PORT_UNREACHABLE) as u64;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let csum = !(sum as u16);
    let mut icmp = [0u8; ICMP_HDR_LEN];
    icmp[..2].copy_from_slice(&ICMP6_PORT_UNREACHABLE);
    icmp[2..4].copy_from_slice(&csum.to_ne_bytes());
    ctx.store(ETH_HDR_LEN + IP6_HDR_LEN, &icmp, 0)
        .map_err(|_| DropReason::Rewrite)?;

    // SAFETY: reading the context's own field; plain helper call.
    let ret = unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) };
    Ok(ret as i32)
}

/// Sum of an address's 16-bit words as read natively.
#[inline(always)]
fn native_words(a: &lb_common::RawAddr) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 16 {
        sum += u16::from_ne_bytes([a[i], a[i + 1]]) as u64;
        i += 2;
    }
    sum
}
