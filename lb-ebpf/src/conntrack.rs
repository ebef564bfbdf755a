//! Flow state: forward entries pin a client flow to its backend, reply
//! entries let the backend's answers be translated back to the VIP.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    CtEntry, CtKey, CtKind, RawAddr,
    conntrack::{ct_flags, ct_timeouts},
    proto,
};

use crate::{
    maps::{CONFIG, CONNTRACK, SCRATCH, SCRATCH_KEY},
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
        src_addr: pkt.src,
        dst_addr: pkt.dst,
        src_port: pkt.sport,
        dst_port: pkt.dport,
        proto: pkt.proto,
        kind: kind as u8,
        _pad: [0; 2],
    }
}

/// Sets `k` to the key the backend's replies carry: from the backend to
/// `to` — the client, or the node address and port the flow is masqueraded as.
#[inline(always)]
pub fn set_reply_key(
    k: &mut CtKey,
    backend_addr: &RawAddr,
    backend_port: u16,
    to_addr: &RawAddr,
    to_port: u16,
    proto: u8,
) {
    set_tuple_key(
        k,
        (backend_addr, backend_port),
        (to_addr, to_port),
        proto,
        CtKind::Reply,
    );
}

/// Sets `k` to the `kind` key of packets from `src` to `dst` (address, port in host order).
#[inline(always)]
pub fn set_tuple_key(k: &mut CtKey, src: (&RawAddr, u16), dst: (&RawAddr, u16), proto: u8, kind: CtKind) {
    k.src_addr = *src.0;
    k.dst_addr = *dst.0;
    k.src_port = src.1;
    k.dst_port = dst.1;
    k.proto = proto;
    k.kind = kind as u8;
    k._pad = [0; 2];
}

/// Sets `k` to `pkt`'s own key of `kind`.
#[inline(always)]
pub fn set_key(k: &mut CtKey, pkt: &Packet, kind: CtKind) {
    k.src_addr = pkt.src;
    k.dst_addr = pkt.dst;
    k.src_port = pkt.sport;
    k.dst_port = pkt.dport;
    k.proto = pkt.proto;
    k.kind = kind as u8;
    k._pad = [0; 2];
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

/// Fills `e` (in place: a CtEntry is too big to build on the BPF stack)
/// for a new flow of `pkt`, translated to `nat_addr`:`nat_port`, no SNAT.
#[inline(always)]
pub fn init_entry(
    e: &mut CtEntry,
    pkt: &Packet,
    nat_addr: &RawAddr,
    nat_port: u16,
    backend_id: u32,
    service_id: u32,
    now: u32,
) {
    e.nat_addr = *nat_addr;
    e.nat_port = nat_port;
    e.tcp_flags_seen = pkt.tcp_flags;
    e.flags = 0;
    e.backend_id = backend_id;
    e.service_id = service_id;
    e.expires_at = now + lifetime(pkt.proto, pkt.tcp_flags);
    e.snat_addr = [0; 16];
    e.snat_port = 0;
    e._pad = [0; 2];
}

/// This CPU's key slot (see maps::SCRATCH_KEY): keys of new entries are
/// built there rather than on the stack.
#[inline(always)]
pub fn key_slot<'a>() -> Option<&'a mut CtKey> {
    // SAFETY: per-CPU slot; a program run owns it until it returns.
    SCRATCH_KEY.get_ptr_mut(0).map(|p| unsafe { &mut *p })
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
