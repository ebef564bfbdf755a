//! Address/port rewrites with incremental checksum updates: through the skb
//! helpers at TC, which also handle CHECKSUM_PARTIAL packets from local
//! sockets; by direct writes on XDP frames.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{DropReason, proto};

use crate::{
    ctx::PacketCtx,
    parse::{IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, Packet, ptr_at},
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// DNAT: client → VIP becomes client → backend.
    Destination,
    /// Reverse NAT: backend → client becomes VIP → client.
    Source,
}

/// Rewrites one side's IPv4 address (as read from the packet) and L4 port
/// (host order) and fixes both checksums.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, side: Side, new_addr: u32, new_port: u16) -> Result<(), DropReason> {
    let (old_addr, old_port, addr_off, port_off) = match side {
        Side::Destination => (pkt.dst, pkt.dport, IP_DST_OFF, pkt.l4_off + 2),
        Side::Source => (pkt.src, pkt.sport, IP_SRC_OFF, pkt.l4_off),
    };
    // UDP checksum 0 means "none": keep it 0 (and never produce 0).
    let mangled = if pkt.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off();
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )
        .map_err(|_| DropReason::Rewrite)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| DropReason::Rewrite)?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| DropReason::Rewrite)?;
    }
    if old_port != new_port {
        let (old_port, new_port) = (old_port.to_be(), new_port.to_be());
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(|_| DropReason::Rewrite)?;
        ctx.store(port_off, &new_port, 0).map_err(|_| DropReason::Rewrite)?;
    }
    Ok(())
}

/// A flow's addresses and ports after translation (addresses as in the
/// packet, ports in host order).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: u32,
    pub dst: u32,
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

/// Rewrites an XDP frame to `to` (and decrements the TTL): direct writes
/// with incremental checksums. XDP frames come from a wire with complete
/// checksums (no CHECKSUM_PARTIAL), so every field is updated in full.
#[inline(always)]
pub fn rewrite_frame(ctx: &impl PacketCtx, pkt: &Packet, to: &Tuple) -> Result<(), DropReason> {
    let l4_off = pkt.checked_l4_off()?;
    let l4_csum_off = if pkt.proto == proto::TCP {
        l4_off + 16
    } else {
        l4_off + 6
    };
    let ip_csum = ptr_at::<u16>(ctx, IP_CSUM_OFF)? as *mut u16;
    let l4_csum = ptr_at::<u16>(ctx, l4_csum_off)? as *mut u16;
    let src = ptr_at::<u32>(ctx, IP_SRC_OFF)? as *mut u32;
    let dst = ptr_at::<u32>(ctx, IP_DST_OFF)? as *mut u32;
    let sport = ptr_at::<u16>(ctx, l4_off)? as *mut u16;
    let dport = ptr_at::<u16>(ctx, l4_off + 2)? as *mut u16;
    let ttl = ptr_at::<u8>(ctx, IP_TTL_OFF)? as *mut u8;
    // TTL and protocol share one 16-bit word of the header checksum.
    let old_ttl_word = u16::from_ne_bytes([pkt.ttl, pkt.proto]) as u32;
    let new_ttl_word = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]) as u32;
    // SAFETY: every pointer bounds-checked by ptr_at; unaligned accesses.
    unsafe {
        let mut ip_check = ip_csum.read_unaligned();
        let mut l4_check = l4_csum.read_unaligned();
        // UDP checksum 0 means "none": it stays 0.
        let l4_summed = !(pkt.proto == proto::UDP && l4_check == 0);
        ip_check = csum_replace(ip_check, pkt.src, to.src);
        ip_check = csum_replace(ip_check, pkt.dst, to.dst);
        ip_check = csum_replace(ip_check, old_ttl_word, new_ttl_word);
        if l4_summed {
            // Addresses are in the L4 pseudo-header.
            l4_check = csum_replace(l4_check, pkt.src, to.src);
            l4_check = csum_replace(l4_check, pkt.dst, to.dst);
            l4_check = csum_replace(l4_check, pkt.sport.to_be() as u32, to.sport.to_be() as u32);
            l4_check = csum_replace(l4_check, pkt.dport.to_be() as u32, to.dport.to_be() as u32);
            if pkt.proto == proto::UDP && l4_check == 0 {
                l4_check = 0xffff;
            }
            l4_csum.write_unaligned(l4_check);
        }
        ip_csum.write_unaligned(ip_check);
        src.write_unaligned(to.src);
        dst.write_unaligned(to.dst);
        sport.write_unaligned(to.sport.to_be());
        dport.write_unaligned(to.dport.to_be());
        ttl.write_unaligned(pkt.ttl - 1);
    }
    Ok(())
}
