//! Address/port rewrites with incremental checksum updates through the skb
//! helpers, which also handle CHECKSUM_PARTIAL packets from local sockets.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{DropReason, proto};

use crate::parse::{IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, Packet};

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
