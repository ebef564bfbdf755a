//! Flow state: forward entries pin a client flow to its backend, reply
//! entries let the backend's answers be translated back to the VIP.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    CtEntry, CtKey, CtKind, CtState, RawAddr,
    conntrack::{ct_timeouts, entry_flags},
};

use crate::{
    maps::{CONFIG, CONNTRACK, CONNTRACK_PREV, SCRATCH, SCRATCH_KEY},
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

/// How long a flow in `state` lives after a packet.
#[inline(always)]
fn lifetime(state: CtState) -> u32 {
    // The agent's --conntrack-* settings, else the defaults.
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let pick = |configured: u32, default: u32| if configured != 0 { configured } else { default };
    match state {
        CtState::TcpSyn => pick(cfg.tcp_syn_timeout, ct_timeouts::TCP_SYN),
        CtState::TcpEstablished => pick(cfg.tcp_established_timeout, ct_timeouts::TCP_ESTABLISHED),
        CtState::TcpCloseWait => pick(cfg.tcp_close_wait_timeout, ct_timeouts::TCP_CLOSE_WAIT),
        CtState::TcpClosing => pick(cfg.tcp_closing_timeout, ct_timeouts::TCP_CLOSING),
        CtState::Unreplied => pick(cfg.udp_timeout, ct_timeouts::UDP),
        CtState::Stream => pick(cfg.udp_stream_timeout, ct_timeouts::UDP_STREAM),
        CtState::SctpHandshake => ct_timeouts::SCTP_HANDSHAKE,
        CtState::SctpEstablished => ct_timeouts::SCTP_ESTABLISHED,
        CtState::SctpClosing => ct_timeouts::SCTP_CLOSING,
    }
}

/// A live entry for `key`, or `None` when absent or expired. During a
/// migration the previous table has the last word on a flow absent here
/// or only copied here by the agent (`MIGRATED`): the previous programs
/// may have changed it since (a client reusing a port re-balances a
/// closed flow); it is then copied over.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u32) -> Option<*mut CtEntry> {
    let mut entry = CONNTRACK.get_ptr_mut(key);
    // SAFETY: pointer from a successful lookup; fields are plain integers.
    let copied = entry.is_some_and(|e| unsafe { (*e).flags } & entry_flags::MIGRATED != 0);
    if (entry.is_none() || copied) && take_from_prev(key) {
        entry = CONNTRACK.get_ptr_mut(key);
    }
    let entry = entry?;
    if copied {
        // SAFETY: as above; this run owns the entry.
        unsafe { (*entry).flags &= !entry_flags::MIGRATED };
    }
    live(entry, now)
}

/// `lookup` in CONNTRACK only, for a path whose miss is handled by
/// another that uses `lookup` (XDP passes it to TC); it has no stack to
/// spare for the previous table.
#[inline(always)]
pub fn lookup_current(key: &CtKey, now: u32) -> Option<*mut CtEntry> {
    live(CONNTRACK.get_ptr_mut(key)?, now)
}

#[inline(always)]
fn live(entry: *mut CtEntry, now: u32) -> Option<*mut CtEntry> {
    // SAFETY: pointer from a successful lookup; fields are plain integers.
    if unsafe { (*entry).expires_at } < now {
        return None;
    }
    Some(entry)
}

/// CONNTRACK_PREV's only key, as a global: a key on the stack would cost
/// paths that are already at the 512-byte limit.
static PREV_SLOT: u32 = 0;

/// During a migration (see maps::CONNTRACK_PREV): copies `key`'s entry
/// from the previous table over this one's, if it has one; true when it
/// did. Inlined: a call frame of its own would overflow the XDP path's
/// 512-byte stack.
#[inline(always)]
fn take_from_prev(key: &CtKey) -> bool {
    // SAFETY: the inner map is only used through helpers.
    let Some(prev) = (unsafe { CONNTRACK_PREV.get(&PREV_SLOT) }) else {
        return false;
    };
    let Some(entry) = prev.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup, read by the helper.
    CONNTRACK.insert(key, unsafe { &*entry }, 0).is_ok()
}

/// During a migration, copies the entries of the flow `new_flow` has just
/// recorded for `pkt` (its forward entry is in the scratch slot) to the
/// previous table too: an interface still running the previous programs
/// then knows the flow. Called after `new_flow`, from the top level: that
/// call chain has no stack to spare.
#[inline(never)]
pub fn mirror_new_flow(pkt: &Packet) {
    // SAFETY: the inner map is only used through helpers.
    let Some(prev) = (unsafe { CONNTRACK_PREV.get(&PREV_SLOT) }) else {
        return;
    };
    let (Some(e), Some(k)) = (scratch(), key_slot()) else {
        return;
    };
    let mirror = |k: &CtKey| {
        if let Some(entry) = CONNTRACK.get_ptr_mut(k) {
            // SAFETY: pointer from a successful lookup, read by the helper.
            let _ = prev.insert(k, unsafe { &*entry }, 0);
        }
    };
    set_key(k, pkt, CtKind::Forward);
    mirror(k);
    let snat = e.flags & entry_flags::SNAT != 0;
    let (to, to_port) = if snat {
        (e.snat_addr, e.snat_port)
    } else {
        (pkt.src, pkt.sport)
    };
    set_reply_key(k, &e.nat_addr, e.nat_port, &to, to_port, pkt.proto);
    mirror(k);
    if snat {
        // Stack forwarding's egress masquerade entry, if there is one.
        set_tuple_key(
            k,
            (&pkt.src, pkt.sport),
            (&e.nat_addr, e.nat_port),
            pkt.proto,
            CtKind::Snat,
        );
        mirror(k);
    }
}

/// Records this packet on a live entry of `kind`: TCP flags, "replied",
/// a later expiry. Writes only when something changed (at most about once
/// a second on a busy flow), to keep cache lines quiet; each write also
/// brings the other direction's entry in step, so the flow lives as long
/// as either direction is active, as one nf_conntrack entry does.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, pkt: &Packet, kind: CtKind, now: u32) {
    // SAFETY: pointer from a successful lookup in this program run; no
    // other reference to the entry is live.
    let e = unsafe { &mut *entry };
    let own = e.tcp_flags_seen | pkt.tcp_flags;
    let flags = match kind {
        CtKind::Reply => e.flags | entry_flags::REPLIED,
        CtKind::Forward | CtKind::Snat => e.flags,
    };
    let state = CtState::of(pkt.proto, own, e.peer_tcp_flags, flags & entry_flags::REPLIED != 0);
    let expires = now + lifetime(state);
    if own == e.tcp_flags_seen && flags == e.flags && expires <= e.expires_at + 1 {
        return;
    }
    e.tcp_flags_seen = own;
    e.flags = flags;
    e.expires_at = expires;
    sync_peer(e, pkt, kind);
}

/// Copies `e`'s state (its TCP flags as the peer's, "replied", expiry) to
/// the other direction's entry of the flow, found from `e` and the packet:
/// forward entry (client → frontend) ↔ reply entry (backend → client, or
/// → the node address and port of a masqueraded flow).
#[inline(always)]
fn sync_peer(e: &CtEntry, pkt: &Packet, kind: CtKind) {
    let Some(k) = key_slot() else { return };
    let snat = e.flags & entry_flags::SNAT != 0;
    match kind {
        CtKind::Forward => {
            let (to, to_port) = if snat {
                (e.snat_addr, e.snat_port)
            } else {
                (pkt.src, pkt.sport)
            };
            set_reply_key(k, &e.nat_addr, e.nat_port, &to, to_port, pkt.proto);
        }
        CtKind::Reply => {
            let (client, client_port) = if snat {
                (e.snat_addr, e.snat_port)
            } else {
                (pkt.dst, pkt.dport)
            };
            k.src_addr = client;
            k.dst_addr = e.nat_addr;
            k.src_port = client_port;
            k.dst_port = e.nat_port;
            k.proto = pkt.proto;
            k.kind = CtKind::Forward as u8;
            k._pad = [0; 2];
        }
        // Stack forwarding's egress masquerade entry lives on its own.
        CtKind::Snat => return,
    }
    if let Some(peer) = CONNTRACK.get_ptr_mut(k) {
        // SAFETY: pointer from a successful lookup; the peer is another
        // entry than `e` (its key differs in `kind`).
        let peer = unsafe { &mut *peer };
        peer.peer_tcp_flags = e.tcp_flags_seen;
        peer.flags |= e.flags & entry_flags::REPLIED;
        peer.expires_at = e.expires_at;
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
    e.expires_at = now + lifetime(CtState::of(pkt.proto, pkt.tcp_flags, 0, false));
    e.snat_addr = [0; 16];
    e.snat_port = 0;
    e.peer_tcp_flags = 0;
    e._pad = 0;
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
