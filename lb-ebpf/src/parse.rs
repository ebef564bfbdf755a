//! Bounded header parsing: Ethernet → IPv4 → TCP/UDP. Every read goes
//! through `ptr_at`; the L4 offset comes from IHL, so IP options are skipped.

use crate::ctx::PacketCtx;
use core::mem::size_of;
use lb_common::{DropReason, proto};

pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Largest header stack we read (Ethernet + IPv4 with options + TCP): what we
/// ask the kernel to make linear before parsing.
const MAX_HDR_LEN: u32 = (MAX_L4_OFF + 20) as u32;
/// Where L4 starts at the latest: Ethernet + IPv4 header with all options.
const MAX_L4_OFF: usize = ETH_HDR_LEN + 60;

pub const IP_TTL_OFF: usize = ETH_HDR_LEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HDR_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_HDR_LEN + 12;
pub const IP_DST_OFF: usize = ETH_HDR_LEN + 16;

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// TCP and UDP share the first four bytes (ports); TCP flags are byte 13.
#[repr(C)]
struct Ports {
    source: u16,
    dest: u16,
}

/// Where a packet stands with respect to IP fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    None,
    /// Offset 0 with more fragments to come: has the L4 header.
    First,
    /// Offset > 0: no L4 header at all.
    Later,
}

/// What the balancer needs from a packet: addresses as read (network
/// order), ports converted to host order like the map keys.
pub struct Packet {
    pub l4_off: usize,
    /// IPv4 total length and TTL (for the FIB lookup and forwarding).
    pub tot_len: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    pub fragment: Fragment,
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    /// `l4_off` with its bound restated for the verifier, which forgets it
    /// when the packet is handed to another BPF function: needed for
    /// direct packet access at that offset.
    #[inline(always)]
    pub fn checked_l4_off(&self) -> Result<usize, DropReason> {
        let off = self.l4_off;
        if off > MAX_L4_OFF {
            return Err(DropReason::BadIpHeader);
        }
        Ok(off)
    }
}

/// The one bounds-checked accessor into packet data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl PacketCtx, offset: usize) -> Result<*const T, DropReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(DropReason::Truncated);
    }
    Ok((start + offset) as *const T)
}

/// `Ok(None)`: not IPv4 TCP/UDP (or a later fragment), not ours: pass it.
/// `Err`: an IPv4 packet too broken to forward safely.
#[inline(always)]
pub fn parse(ctx: &impl PacketCtx) -> Result<Option<Packet>, DropReason> {
    // Headers of a GSO/non-linear skb may sit outside the linear area.
    ctx.make_readable(if ctx.len() < MAX_HDR_LEN {
        ctx.len()
    } else {
        MAX_HDR_LEN
    });

    let Ok(eth_type) = ptr_at::<u16>(ctx, 12) else {
        return Ok(None); // shorter than Ethernet: not an IP packet we know
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { eth_type.read_unaligned() }) != ETH_P_IP {
        return Ok(None);
    }

    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN)?;
    // SAFETY: bounds checked by ptr_at; reads are unaligned-safe.
    let (version_ihl, tot_len, frag_off, protocol, src, dst, ttl) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be(core::ptr::addr_of!((*ip).tot_len).read_unaligned()),
            u16::from_be(core::ptr::addr_of!((*ip).frag_off).read_unaligned()),
            (*ip).protocol,
            core::ptr::addr_of!((*ip).saddr).read_unaligned(),
            core::ptr::addr_of!((*ip).daddr).read_unaligned(),
            (*ip).ttl,
        )
    };
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || ihl < 5 || (tot_len as usize) < ihl * 4 {
        return Err(DropReason::BadIpHeader);
    }
    if protocol != proto::TCP && protocol != proto::UDP && protocol != proto::ICMP {
        return Ok(None);
    }
    let fragment = if frag_off & 0x1fff != 0 {
        Fragment::Later
    } else if frag_off & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    if fragment == Fragment::Later {
        return Ok(None);
    }

    let l4_off = ETH_HDR_LEN + ihl * 4;
    // TCP header; UDP header; ICMP header (for ICMP, `sport` holds type and
    // code, `dport` the checksum).
    let min_l4 = if protocol == proto::TCP { 20 } else { 8 };
    if l4_off + min_l4 > ctx.data_end() - ctx.data() {
        return Err(DropReason::Truncated);
    }
    let ports = ptr_at::<Ports>(ctx, l4_off)?;
    let tcp_flags = if protocol == proto::TCP {
        // SAFETY: bounds checked by ptr_at.
        unsafe { *ptr_at::<u8>(ctx, l4_off + 13)? }
    } else {
        0
    };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport) = unsafe {
        (
            u16::from_be(core::ptr::addr_of!((*ports).source).read_unaligned()),
            u16::from_be(core::ptr::addr_of!((*ports).dest).read_unaligned()),
        )
    };
    Ok(Some(Packet {
        l4_off,
        tot_len,
        ttl,
        proto: protocol,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        fragment,
    }))
}
