//! Flow state: forward entries pin a client flow to its backend, reply
//! entries let the backend's answers be translated back to the VIP.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    CtEntry, CtKey, CtKind, RawAddr,
    addr::from_v4_word,
    conntrack::{ct_flags, ct_timeouts, entry_flags},
    proto,
};

use crate::{
    maps::{CONFIG, CONNTRACK, SCRATCH},
    parse::Packet,
};

#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
pub fn key(pkt: &Packet, kind: CtKind) -> CtKey {
    CtKey {
        src_addr: from_v4_word(pkt.src),
        dst_addr: from_v4_word(pkt.dst),
        src_port: pkt.sport,
        dst_port: pkt.dport,
        proto: pkt.proto,
        kind: kind as u8,
        _pad: [0; 2],
    }
}

/// The key the backend's replies carry: from the backend to `to` — the
/// client, or the node address and port the flow is masqueraded as.
#[inline(always)]
pub fn reply_key(backend_addr: &RawAddr, backend_port: u16, to_addr: u32, to_port: u16, proto: u8) -> CtKey {
    CtKey {
        src_addr: *backend_addr,
        dst_addr: from_v4_word(to_addr),
        src_port: backend_port,
        dst_port: to_port,
        proto,
        kind: CtKind::Reply as u8,
        _pad: [0; 2],
    }
}

/// How long a flow lives after a packet with `flags_seen` so far.
#[inline(always)]
fn lifetime(pkt_proto: u8, flags_seen: u8) -> u32 {
    // The agent's --conntrack-* settings, else the defaults.
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let pick = |configured: u32, default: u32| if configured != 0 { configured } else { default };
    if pkt_proto != proto::TCP {
        pick(cfg.udp_timeout, ct_timeouts::NON_TCP)
    } else if flags_seen & (ct_flags::FIN | ct_flags::RST) != 0 {
        pick(cfg.tcp_closing_timeout, ct_timeouts::TCP_CLOSING)
    } else if flags_seen & ct_flags::ACK != 0 {
        pick(cfg.tcp_established_timeout, ct_timeouts::TCP_ESTABLISHED)
    } else {
        pick(cfg.tcp_syn_timeout, ct_timeouts::TCP_SYN)
    }
}

/// A live entry for `key`, or `None` when absent or expired.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u32) -> Option<*mut CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup; fields are plain integers.
    if unsafe { (*entry).expires_at } < now {
        return None;
    }
    Some(entry)
}

/// Records this packet on a live entry: TCP flags and a later expiry. Writes
/// only when something changed, to keep cache lines quiet on busy flows.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, pkt: &Packet, now: u32) {
    // SAFETY: pointer from a successful lookup in this program run.
    unsafe {
        let flags = (*entry).tcp_flags_seen | pkt.tcp_flags;
        let expires = now + lifetime(pkt.proto, flags);
        if flags != (*entry).tcp_flags_seen || expires > (*entry).expires_at + 1 {
            (*entry).tcp_flags_seen = flags;
            (*entry).expires_at = expires;
        }
    }
}

#[inline(always)]
pub fn new_entry(
    pkt: &Packet,
    nat_addr: RawAddr,
    nat_port: u16,
    snat: Option<(RawAddr, u16)>,
    backend_id: u32,
    service_id: u32,
    now: u32,
) -> CtEntry {
    let (flags, snat_addr, snat_port) = match snat {
        Some((addr, port)) => (entry_flags::SNAT, addr, port),
        None => (0, [0; 16], 0),
    };
    CtEntry {
        nat_addr,
        nat_port,
        tcp_flags_seen: pkt.tcp_flags,
        flags,
        backend_id,
        service_id,
        expires_at: now + lifetime(pkt.proto, pkt.tcp_flags),
        snat_addr,
        snat_port,
        _pad: [0; 2],
    }
}

/// This CPU's scratch entry (see maps::SCRATCH).
#[inline(always)]
pub fn scratch<'a>() -> Option<&'a mut CtEntry> {
    // SAFETY: per-CPU slot; a program run owns it until it returns.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn insert(key: &CtKey, entry: &CtEntry) -> Result<(), i32> {
    CONNTRACK.insert(key, entry, 0)
}
