//! Bounded header parsing: Ethernet → IPv4 or IPv6 (extension headers
//! skipped) → TCP/UDP/SCTP. Every read goes through `ptr_at`; the IPv4 L4
//! offset comes from IHL, so IP options are skipped.

use crate::{ctx::PacketCtx, maps::PACKET};
use core::mem::size_of;
use lb_common::{DropReason, RawAddr, addr::from_v4_word, proto, sctp};

pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Largest IPv4 header stack we read (Ethernet + IPv4 with options + TCP)
/// and how much of an IPv6 packet (room for a few extension headers): what
/// we ask the kernel to make linear before parsing.
const MAX_HDR_LEN: u32 = (MAX_L4_OFF + 20) as u32;
const MAX_HDR_LEN_V6: u32 = 256;
/// Where IPv4's L4 starts at the latest: Ethernet + IPv4 with all options.
const MAX_L4_OFF: usize = ETH_HDR_LEN + 60;
/// IPv6 extension headers walked before giving up (the packet then passes
/// untouched, as anything not ours does).
const MAX_EXT_HDRS: usize = 4;

pub const IP_TTL_OFF: usize = ETH_HDR_LEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HDR_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_HDR_LEN + 12;
pub const IP_DST_OFF: usize = ETH_HDR_LEN + 16;
pub const IP6_HOP_LIMIT_OFF: usize = ETH_HDR_LEN + 7;
pub const IP6_SRC_OFF: usize = ETH_HDR_LEN + 8;
pub const IP6_DST_OFF: usize = ETH_HDR_LEN + 24;
const IP6_HDR_LEN: usize = 40;

mod ext {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DEST_OPTIONS: u8 = 60;
}

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

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: RawAddr,
    daddr: RawAddr,
}

/// TCP, UDP and SCTP share the first four bytes (ports); TCP flags are
/// byte 13.
#[repr(C)]
struct Ports {
    source: u16,
    dest: u16,
}

/// Where a packet stands with respect to IP fragmentation.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    None,
    /// Offset 0 with more fragments to come: has the L4 header.
    First,
    /// Offset > 0: no L4 header at all.
    Later,
}

/// What the balancer needs from a packet: addresses as read (network
/// order; IPv4 as IPv4-mapped), ports converted to host order like the map
/// keys. Lives in this CPU's maps::PACKET slot, off the 512-byte stack.
#[repr(C)]
pub struct Packet {
    pub l4_off: usize,
    pub v6: bool,
    /// IP total length (IPv6: payload + fixed header) and TTL / hop limit
    /// (for the FIB lookup and forwarding).
    pub tot_len: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: RawAddr,
    pub dst: RawAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte; SCTP: its first chunk's type as conntrack state bits
    /// (`sctp::ct_flags_of`); 0 for UDP.
    pub tcp_flags: u8,
    pub fragment: Fragment,
}

impl Packet {
    /// Offset of the L4 checksum field (TCP, UDP; SCTP's CRC32c is not an
    /// Internet checksum: see `sctp_len`).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    /// SCTP: the bytes its CRC32c covers (common header to the end of the
    /// IP payload; parse checked it holds the common header).
    #[inline(always)]
    pub fn sctp_len(&self) -> u16 {
        self.tot_len.wrapping_sub((self.l4_off - ETH_HDR_LEN) as u16)
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

/// Parses into this CPU's packet slot. `Ok(None)`: not IPv4/IPv6 TCP/UDP/SCTP
/// (or a later fragment), not ours: pass it. `Err`: a packet too broken to
/// forward safely.
#[inline(always)]
pub fn parse<'a>(ctx: &impl PacketCtx) -> Result<Option<&'a Packet>, DropReason> {
    let Ok(eth_type) = ptr_at::<u16>(ctx, 12) else {
        return Ok(None); // shorter than Ethernet: not an IP packet we know
    };
    // SAFETY: bounds checked by ptr_at.
    let eth_type = u16::from_be(unsafe { eth_type.read_unaligned() });
    let v6 = eth_type == ETH_P_IPV6;
    if eth_type != ETH_P_IP && !v6 {
        return Ok(None);
    }
    // Headers of a GSO/non-linear skb may sit outside the linear area.
    let want = if v6 { MAX_HDR_LEN_V6 } else { MAX_HDR_LEN };
    ctx.make_readable(if ctx.len() < want { ctx.len() } else { want });
    let Some(slot) = PACKET.get_ptr_mut(0) else {
        return Ok(None);
    };
    // SAFETY: this CPU's slot; a program run owns it until it returns.
    let pkt = unsafe { &mut *slot };
    pkt.v6 = v6;
    let ours = if v6 { parse_v6(ctx, pkt)? } else { parse_v4(ctx, pkt)? };
    if !ours {
        return Ok(None);
    }
    ports(ctx, pkt)?;
    Ok(Some(pkt))
}

#[inline(always)]
fn parse_v4(ctx: &impl PacketCtx, pkt: &mut Packet) -> Result<bool, DropReason> {
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
    if !is_ours(protocol) && protocol != proto::ICMP {
        return Ok(false);
    }
    let fragment = if frag_off & 0x1fff != 0 {
        Fragment::Later
    } else if frag_off & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    if fragment == Fragment::Later {
        return Ok(false);
    }
    pkt.l4_off = ETH_HDR_LEN + ihl * 4;
    pkt.tot_len = tot_len;
    pkt.ttl = ttl;
    pkt.proto = protocol;
    pkt.src = from_v4_word(src);
    pkt.dst = from_v4_word(dst);
    pkt.fragment = fragment;
    Ok(true)
}

/// IPv6: the fixed header, then hop-by-hop / routing / destination options
/// headers skipped by their length, a fragment header read like IPv4's
/// fragment fields. ICMPv6 (NDP, errors) and other protocols are not ours.
#[inline(always)]
fn parse_v6(ctx: &impl PacketCtx, pkt: &mut Packet) -> Result<bool, DropReason> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HDR_LEN)?;
    // SAFETY: bounds checked by ptr_at; reads are unaligned-safe.
    let (version, payload_len, mut next, hop_limit) = unsafe {
        (
            (*ip).version_class_flow[0] >> 4,
            u16::from_be(core::ptr::addr_of!((*ip).payload_len).read_unaligned()),
            (*ip).next_header,
            (*ip).hop_limit,
        )
    };
    if version != 6 {
        return Err(DropReason::BadIpHeader);
    }
    let mut off = ETH_HDR_LEN + IP6_HDR_LEN;
    let mut fragment = Fragment::None;
    for _ in 0..MAX_EXT_HDRS {
        match next {
            ext::HOP_BY_HOP | ext::ROUTING | ext::DEST_OPTIONS => {
                let h = ptr_at::<[u8; 2]>(ctx, off)?;
                // SAFETY: bounds checked by ptr_at.
                let [nh, len] = unsafe { h.read_unaligned() };
                next = nh;
                off += (len as usize + 1) * 8;
            }
            ext::FRAGMENT => {
                let h = ptr_at::<[u8; 4]>(ctx, off)?;
                // SAFETY: bounds checked by ptr_at.
                let [nh, _, hi, lo] = unsafe { h.read_unaligned() };
                let offset_flags = u16::from_be_bytes([hi, lo]);
                if offset_flags & 0xfff8 != 0 {
                    return Ok(false); // a later fragment: no L4 header
                }
                if offset_flags & 1 != 0 {
                    fragment = Fragment::First;
                }
                next = nh;
                off += 8;
            }
            _ => break,
        }
    }
    if !is_ours(next) && next != proto::ICMPV6 {
        return Ok(false);
    }
    // SAFETY: bounds checked by ptr_at above (the fixed header).
    unsafe {
        pkt.src = core::ptr::addr_of!((*ip).saddr).read_unaligned();
        pkt.dst = core::ptr::addr_of!((*ip).daddr).read_unaligned();
    }
    pkt.l4_off = off;
    pkt.tot_len = payload_len.saturating_add(IP6_HDR_LEN as u16);
    pkt.ttl = hop_limit;
    pkt.proto = next;
    pkt.fragment = fragment;
    Ok(true)
}

/// The transport protocols balanced.
#[inline(always)]
fn is_ours(protocol: u8) -> bool {
    protocol == proto::TCP || protocol == proto::UDP || protocol == proto::SCTP
}

/// The L4 ports (and TCP flags / SCTP state) at `pkt.l4_off`.
#[inline(always)]
fn ports(ctx: &impl PacketCtx, pkt: &mut Packet) -> Result<(), DropReason> {
    // TCP header; SCTP common header; UDP header; ICMP / ICMPv6 header (for
    // those, `sport` holds type and code, `dport` the checksum).
    let l4_off = pkt.l4_off;
    let min_l4 = match pkt.proto {
        proto::TCP => 20,
        proto::SCTP => sctp::COMMON_HDR_LEN,
        _ => 8,
    };
    if l4_off + min_l4 > ctx.data_end() - ctx.data() {
        return Err(DropReason::Truncated);
    }
    let ports = ptr_at::<Ports>(ctx, l4_off)?;
    pkt.tcp_flags = match pkt.proto {
        // SAFETY: bounds checked by ptr_at.
        proto::TCP => unsafe { *ptr_at::<u8>(ctx, l4_off + 13)? },
        proto::SCTP => sctp_state(ctx, pkt)?,
        _ => 0,
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        pkt.sport = u16::from_be(core::ptr::addr_of!((*ports).source).read_unaligned());
        pkt.dport = u16::from_be(core::ptr::addr_of!((*ports).dest).read_unaligned());
    }
    Ok(())
}

/// SCTP: checks the IP length covers the common header (the CRC32c update
/// depends on it) and maps the first chunk's type to conntrack state bits
/// (none without a chunk).
#[inline(always)]
fn sctp_state(ctx: &impl PacketCtx, pkt: &Packet) -> Result<u8, DropReason> {
    let l3_len = pkt.l4_off - ETH_HDR_LEN;
    if (pkt.tot_len as usize) < l3_len + sctp::COMMON_HDR_LEN {
        return Err(DropReason::Truncated);
    }
    if (pkt.tot_len as usize) < l3_len + sctp::FIRST_CHUNK_HDR_END {
        return Ok(0);
    }
    // SAFETY: bounds checked by ptr_at.
    let chunk_type = unsafe { *ptr_at::<u8>(ctx, pkt.l4_off + sctp::COMMON_HDR_LEN)? };
    Ok(sctp::ct_flags_of(chunk_type))
}
