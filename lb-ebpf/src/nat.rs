//! Address/port rewrites with incremental checksum updates: through the skb
//! helpers at TC, which also handle CHECKSUM_PARTIAL packets from local
//! sockets; by direct writes on XDP frames. SCTP's CRC32c covers the ports
//! but not the addresses: it changes only with a port (`sctp` module of
//! lb-common), by direct computation on both paths.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use lb_common::{DropReason, RawAddr, addr::v4_word, proto, sctp};

use crate::parse::{
    IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, IP6_DST_OFF, IP6_HOP_LIMIT_OFF, IP6_SRC_OFF, Packet, ptr_at,
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// DNAT: client → VIP becomes client → backend.
    Destination,
    /// Reverse NAT: backend → client becomes VIP → client.
    Source,
}

/// Rewrites one side's address and L4 port (host order) and fixes the
/// checksums: IPv4's header and L4 checksums, IPv6's L4 checksum (its
/// pseudo-header holds the addresses; there is no header checksum); SCTP's
/// CRC32c when the port changes.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, side: Side, new_addr: &RawAddr, new_port: u16) -> Result<(), DropReason> {
    if pkt.proto == proto::SCTP {
        return rewrite_sctp(ctx, pkt, side, new_addr, new_port);
    }
    let (old_addr, old_port, port_off) = match side {
        Side::Destination => (&pkt.dst, pkt.dport, pkt.l4_off + 2),
        Side::Source => (&pkt.src, pkt.sport, pkt.l4_off),
    };
    // UDP checksum 0 means "none": keep it 0 (and never produce 0).
    let mangled = if pkt.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off();
    if old_addr != new_addr {
        if pkt.v6 {
            let addr_off = match side {
                Side::Destination => IP6_DST_OFF,
                Side::Source => IP6_SRC_OFF,
            };
            rewrite_v6_addr(
                ctx,
                csum_off,
                addr_off,
                old_addr,
                new_addr,
                BPF_F_PSEUDO_HDR as u64 | mangled,
            )?;
        } else {
            let addr_off = match side {
                Side::Destination => IP_DST_OFF,
                Side::Source => IP_SRC_OFF,
            };
            let old_word = v4_word(old_addr).ok_or(DropReason::Rewrite)?;
            let new_word = v4_word(new_addr).ok_or(DropReason::Rewrite)?;
            ctx.l4_csum_replace(
                csum_off,
                old_word as u64,
                new_word as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )
            .map_err(|_| DropReason::Rewrite)?;
            ctx.l3_csum_replace(IP_CSUM_OFF, old_word as u64, new_word as u64, 4)
                .map_err(|_| DropReason::Rewrite)?;
            ctx.store(addr_off, &new_word, 0).map_err(|_| DropReason::Rewrite)?;
        }
    }
    if old_port != new_port {
        let (old_port, new_port) = (old_port.to_be(), new_port.to_be());
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(|_| DropReason::Rewrite)?;
        ctx.store(port_off, &new_port, 0).map_err(|_| DropReason::Rewrite)?;
    }
    Ok(())
}

/// `rewrite` for SCTP: the address with only IPv4's header checksum to fix,
/// the port with the CRC32c (whose arithmetic is a BPF function of its own,
/// without stack: this one is inlined into callers that have little left).
#[inline(always)]
fn rewrite_sctp(
    ctx: &TcContext,
    pkt: &Packet,
    side: Side,
    new_addr: &RawAddr,
    new_port: u16,
) -> Result<(), DropReason> {
    let (old_addr, old_port, port_off, addr_off, addr_off_v6) = match side {
        Side::Destination => (&pkt.dst, pkt.dport, pkt.l4_off + 2, IP_DST_OFF, IP6_DST_OFF),
        Side::Source => (&pkt.src, pkt.sport, pkt.l4_off, IP_SRC_OFF, IP6_SRC_OFF),
    };
    if old_addr != new_addr {
        if pkt.v6 {
            ctx.store(addr_off_v6, new_addr, 0).map_err(|_| DropReason::Rewrite)?;
        } else {
            let old_word = v4_word(old_addr).ok_or(DropReason::Rewrite)?;
            let new_word = v4_word(new_addr).ok_or(DropReason::Rewrite)?;
            ctx.l3_csum_replace(IP_CSUM_OFF, old_word as u64, new_word as u64, 4)
                .map_err(|_| DropReason::Rewrite)?;
            ctx.store(addr_off, &new_word, 0).map_err(|_| DropReason::Rewrite)?;
        }
    }
    if old_port != new_port {
        let crc_off = pkt.l4_off + sctp::CRC_OFF;
        let crc = u32::from_le_bytes(ctx.load::<[u8; 4]>(crc_off).map_err(|_| DropReason::Truncated)?);
        let (sport_xor, dport_xor) = match side {
            Side::Destination => (0, old_port ^ new_port),
            Side::Source => (old_port ^ new_port, 0),
        };
        if let Some(crc) = sctp_crc_after(crc, sport_xor, dport_xor, pkt.sctp_len()) {
            ctx.store(crc_off, &crc.to_le_bytes(), 0)
                .map_err(|_| DropReason::Rewrite)?;
        }
        ctx.store(port_off, &new_port.to_be(), 0)
            .map_err(|_| DropReason::Rewrite)?;
    }
    Ok(())
}

/// The CRC32c (as the checksum field's little-endian value) after the
/// ports change by the given XORs; `None`: leave the field alone (no port
/// changed, or the CRC is yet to be computed). A field of 0 is what the
/// SCTP stack leaves for CRC offload (a CHECKSUM_PARTIAL skb from a local
/// socket, e.g. a pod's through its veth): the CRC is computed later over
/// the bytes as they are then, our ports included, and a delta XORed in
/// now would spoil it. (A computed CRC32c is 0 once in 2^32 packets; such
/// a packet would then arrive with a bad CRC and be retransmitted.)
#[inline(always)]
fn sctp_crc_after(crc: u32, sport_xor: u16, dport_xor: u16, len: u16) -> Option<u32> {
    if crc == 0 || sport_xor | dport_xor == 0 {
        return None;
    }
    Some(crc ^ sctp::crc32c_ports_delta(sport_xor, dport_xor, len))
}

/// An IPv6 address change: the L4 checksum takes the difference of the
/// 16 bytes (`bpf_csum_diff`) as a pseudo-header update.
#[inline(always)]
pub fn rewrite_v6_addr(
    ctx: &TcContext,
    csum_off: usize,
    addr_off: usize,
    old: &RawAddr,
    new: &RawAddr,
    csum_flags: u64,
) -> Result<(), DropReason> {
    let (mut old_copy, mut new_copy) = (*old, *new);
    // SAFETY: both buffers are 16 bytes on our stack.
    let diff = unsafe {
        bpf_csum_diff(
            old_copy.as_mut_ptr() as *mut u32,
            16,
            new_copy.as_mut_ptr() as *mut u32,
            16,
            0,
        )
    };
    if diff < 0 {
        return Err(DropReason::Rewrite);
    }
    // Size 0: `to` is a checksum difference, not a field value.
    ctx.l4_csum_replace(csum_off, 0, diff as u32 as u64, csum_flags)
        .map_err(|_| DropReason::Rewrite)?;
    ctx.store(addr_off, new, 0).map_err(|_| DropReason::Rewrite)
}

/// A flow's addresses and ports after translation (ports in host order).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: RawAddr,
    pub dst: RawAddr,
    pub sport: u16,
    pub dport: u16,
}

/// RFC 1624 eqn. 3: the checksum `check` after a 32-bit word of what it
/// covers changed from `old` to `new`. All three as they sit in the packet:
/// one's-complement sums do not care about byte order.
#[inline(always)]
fn csum_replace(check: u16, old: u32, new: u32) -> u16 {
    let not_old = !old;
    let mut sum = (!check) as u64
        + (not_old >> 16) as u64
        + (not_old & 0xffff) as u64
        + (new >> 16) as u64
        + (new & 0xffff) as u64;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The one's-complement difference (unfolded) an address change makes:
/// the old 16-bit words subtracted, the new ones added (IPv4-mapped
/// addresses differ only in the last four bytes).
#[inline(always)]
fn addr_delta(old: &RawAddr, new: &RawAddr) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 16 {
        let o = u16::from_ne_bytes([old[i], old[i + 1]]);
        let n = u16::from_ne_bytes([new[i], new[i + 1]]);
        sum += (!o) as u64 + n as u64;
        i += 2;
    }
    sum
}

/// `check` with an unfolded difference applied.
#[inline(always)]
fn csum_apply(check: u16, delta: u64) -> u16 {
    let mut sum = (!check) as u64 + delta;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Largest IPv6 L4 offset the XDP path rewrites at (a bound the verifier
/// needs): extension headers beyond it leave the packet to TC.
pub const MAX_XDP_L4_OFF_V6: usize = 14 + 40 + 128;

/// Rewrites an XDP frame from what `pkt` carries to `to` (and decrements
/// the TTL / hop limit): direct writes with incremental checksums. XDP
/// frames come from a wire with complete checksums (no CHECKSUM_PARTIAL),
/// so every field is updated in full.
#[inline(never)]
pub fn rewrite_frame(ctx: &XdpContext, pkt: &Packet, to: &Tuple) -> Result<(), DropReason> {
    let l4_off = pkt.l4_off;
    let bound = if pkt.v6 {
        MAX_XDP_L4_OFF_V6
    } else {
        pkt.checked_l4_off()?
    };
    if l4_off > bound {
        return Err(DropReason::BadIpHeader);
    }
    let sport = ptr_at::<u16>(ctx, l4_off)? as *mut u16;
    let dport = ptr_at::<u16>(ctx, l4_off + 2)? as *mut u16;
    if pkt.proto == proto::SCTP {
        // Addresses are not in the CRC32c: only the ports count.
        let crc = ptr_at::<[u8; 4]>(ctx, l4_off + sctp::CRC_OFF)? as *mut [u8; 4];
        // SAFETY: every pointer bounds-checked by ptr_at; unaligned accesses.
        unsafe {
            let old = u32::from_le_bytes(crc.read_unaligned());
            if let Some(new) = sctp_crc_after(old, pkt.sport ^ to.sport, pkt.dport ^ to.dport, pkt.sctp_len()) {
                crc.write_unaligned(new.to_le_bytes());
            }
            sport.write_unaligned(to.sport.to_be());
            dport.write_unaligned(to.dport.to_be());
        }
        return rewrite_frame_ip(ctx, pkt, to);
    }
    let l4_csum_off = if pkt.proto == proto::TCP {
        l4_off + 16
    } else {
        l4_off + 6
    };
    let l4_csum = ptr_at::<u16>(ctx, l4_csum_off)? as *mut u16;
    // SAFETY: every pointer bounds-checked by ptr_at; unaligned accesses.
    unsafe {
        let mut l4_check = l4_csum.read_unaligned();
        // UDP checksum 0 means "none" (IPv4 only): it stays 0.
        if !(pkt.proto == proto::UDP && l4_check == 0) {
            // Addresses are in the L4 pseudo-header.
            let ports = (!pkt.sport.to_be()) as u64
                + to.sport.to_be() as u64
                + (!pkt.dport.to_be()) as u64
                + to.dport.to_be() as u64;
            l4_check = csum_apply(
                l4_check,
                addr_delta(&pkt.src, &to.src) + addr_delta(&pkt.dst, &to.dst) + ports,
            );
            if pkt.proto == proto::UDP && l4_check == 0 {
                l4_check = 0xffff;
            }
            l4_csum.write_unaligned(l4_check);
        }
        sport.write_unaligned(to.sport.to_be());
        dport.write_unaligned(to.dport.to_be());
    }
    rewrite_frame_ip(ctx, pkt, to)
}

/// The IP half of `rewrite_frame`: addresses, TTL / hop limit, IPv4's
/// header checksum.
#[inline(always)]
fn rewrite_frame_ip(ctx: &XdpContext, pkt: &Packet, to: &Tuple) -> Result<(), DropReason> {
    if pkt.v6 {
        let src = ptr_at::<RawAddr>(ctx, IP6_SRC_OFF)? as *mut RawAddr;
        let dst = ptr_at::<RawAddr>(ctx, IP6_DST_OFF)? as *mut RawAddr;
        let hop_limit = ptr_at::<u8>(ctx, IP6_HOP_LIMIT_OFF)? as *mut u8;
        // SAFETY: as above; no header checksum in IPv6.
        unsafe {
            src.write_unaligned(to.src);
            dst.write_unaligned(to.dst);
            hop_limit.write_unaligned(pkt.ttl - 1);
        }
        return Ok(());
    }
    let ip_csum = ptr_at::<u16>(ctx, IP_CSUM_OFF)? as *mut u16;
    let src = ptr_at::<u32>(ctx, IP_SRC_OFF)? as *mut u32;
    let dst = ptr_at::<u32>(ctx, IP_DST_OFF)? as *mut u32;
    let ttl = ptr_at::<u8>(ctx, IP_TTL_OFF)? as *mut u8;
    let word = |a: &RawAddr| v4_word(a).ok_or(DropReason::Rewrite);
    let (old_src, old_dst, new_src, new_dst) = (word(&pkt.src)?, word(&pkt.dst)?, word(&to.src)?, word(&to.dst)?);
    // TTL and protocol share one 16-bit word of the header checksum.
    let old_ttl_word = u16::from_ne_bytes([pkt.ttl, pkt.proto]) as u32;
    let new_ttl_word = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]) as u32;
    // SAFETY: as above.
    unsafe {
        let mut ip_check = ip_csum.read_unaligned();
        ip_check = csum_replace(ip_check, old_src, new_src);
        ip_check = csum_replace(ip_check, old_dst, new_dst);
        ip_check = csum_replace(ip_check, old_ttl_word, new_ttl_word);
        ip_csum.write_unaligned(ip_check);
        src.write_unaligned(new_src);
        dst.write_unaligned(new_dst);
        ttl.write_unaligned(pkt.ttl - 1);
    }
    Ok(())
}
