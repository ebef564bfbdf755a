//! Service lookup and backend choice: KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendId, BackendSlotKey, DropReason, RawAddr, ServiceKey, ServiceScope,
    ServiceValue, SourceRange, cidr_kind, svc_flags,
};

use crate::{
    maps::{AFFINITY, BACKEND_SLOTS, BACKENDS, CIDRS, MAGLEV, SERVICES, SOURCE_RANGES},
    parse::Packet,
};

/// The service entry for this packet: its frontend's, or, for a source in
/// the cluster CIDR, the frontend's internal entry where it has one
/// (externalTrafficPolicy Local: pods reach every endpoint, unmasqueraded).
#[inline(always)]
pub fn lookup_service(pkt: &Packet) -> Option<ServiceValue> {
    let svc = lookup_frontend(pkt.dst, pkt.dport, pkt.proto)?;
    if svc.flags & svc_flags::IN_CLUSTER_USES_INTERNAL != 0 && cidr_kind_of(&pkt.src) == Some(cidr_kind::CLUSTER) {
        return Some(internal_entry(pkt.dst, pkt.dport, pkt.proto).unwrap_or(svc));
    }
    Some(svc)
}

/// The SERVICES entry of (address, port in host order, protocol).
#[inline(always)]
pub fn lookup_frontend(addr: RawAddr, port: u16, proto: u8) -> Option<ServiceValue> {
    lookup_scoped(addr, port, proto, ServiceScope::Cluster)
}

/// The `Internal` entry of a frontend flagged `IN_CLUSTER_USES_INTERNAL`.
#[inline(always)]
pub fn internal_entry(addr: RawAddr, port: u16, proto: u8) -> Option<ServiceValue> {
    lookup_scoped(addr, port, proto, ServiceScope::Internal)
}

#[inline(always)]
fn lookup_scoped(addr: RawAddr, port: u16, proto: u8, scope: ServiceScope) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr,
        port,
        proto,
        scope: scope as u8,
    };
    // SAFETY: copied out at once; the agent replaces values, never edits them in place.
    unsafe { SERVICES.get(&key).copied() }
}

/// A hash of the flow's 5-tuple (murmur3's finalizer over the mixed
/// words): the same flow always hashes the same, which is what Maglev needs.
#[inline(always)]
pub fn flow_hash(pkt: &Packet) -> u32 {
    hash_words(fold(&pkt.src), fold(&pkt.dst), pkt.sport, pkt.dport, pkt.proto)
}

#[inline(always)]
pub fn hash_words(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = src ^ dst.rotate_left(16) ^ ((sport as u32) << 16 | dport as u32) ^ ((proto as u32) << 8);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// An address's four words XORed (an IPv4-mapped address folds to its
/// IPv4 word xor the mapping prefix: still one value per address).
#[inline(always)]
pub fn fold(a: &RawAddr) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    w(0) ^ w(4) ^ w(8) ^ w(12)
}

/// The backend for a new flow: Maglev (table indexed by the flow hash) when
/// the service has a table, else a uniform random pick among the live
/// revision's slots (the iptables `statistic mode random` cascade gives
/// each of n endpoints 1/n).
#[inline(always)]
pub fn pick_backend(svc: &ServiceValue, hash: u32) -> Result<(BackendId, Backend), DropReason> {
    if svc.backend_count == 0 {
        return Err(DropReason::NoBackend);
    }
    let id = if svc.table_size != 0 {
        let index = hash % svc.table_size;
        // SAFETY: copied out at once.
        unsafe { MAGLEV.get_value(&svc.service_id, &index).copied() }.ok_or(DropReason::BackendSlotMissing)?
    } else {
        // SAFETY: plain helper call.
        let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count;
        let key = BackendSlotKey {
            service_id: svc.service_id,
            revision: svc.revision,
            slot,
        };
        // SAFETY: values are copied out at once.
        unsafe { BACKEND_SLOTS.get(&key).copied() }.ok_or(DropReason::BackendSlotMissing)?
    };
    let backend = lookup_backend(id).ok_or(DropReason::BackendSlotMissing)?;
    Ok((id, backend))
}

#[inline(always)]
fn lookup_backend(id: BackendId) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(&id).copied() }
}

/// A backend still in service `service_id`? (Affinity entries outlive
/// backends: a client's next connection only returns to a backend that
/// still belongs to the service.)
#[inline(always)]
pub fn live_backend(id: BackendId, service_id: u32) -> Option<Backend> {
    lookup_backend(id).filter(|b| b.service_id == service_id)
}

/// ClientIP affinity: the client's backend if it connected within the
/// timeout and that backend is still in the service; otherwise a random
/// pick. Either way the client's entry is refreshed (kube-proxy's `recent`
/// match: --rcheck --seconds, then --set).
#[inline(always)]
pub fn pick_backend_for(
    svc: &ServiceValue,
    client: RawAddr,
    now: u32,
    hash: u32,
) -> Result<(BackendId, Backend), DropReason> {
    if svc.affinity_timeout == 0 {
        return pick_backend(svc, hash);
    }
    let key = AffinityKey {
        client,
        service_id: svc.service_id,
    };
    // SAFETY: copied out at once.
    let remembered = unsafe { AFFINITY.get(&key).copied() }
        .filter(|a| now.wrapping_sub(a.last_used) <= svc.affinity_timeout)
        .and_then(|a| live_backend(a.backend_id, svc.service_id).map(|b| (a.backend_id, b)));
    let (id, backend) = match remembered {
        Some(pick) => pick,
        None => pick_backend(svc, hash)?,
    };
    // A failed update only costs stickiness for the next connection.
    let _ = AFFINITY.insert(
        &key,
        &AffinityValue {
            backend_id: id,
            last_used: now,
        },
        0,
    );
    Ok((id, backend))
}

/// Is `addr` a cluster IP (an `ADDRESS_ONLY` marker entry exists)?
#[inline(always)]
pub fn is_service_address(addr: &RawAddr) -> bool {
    let key = ServiceKey {
        addr: *addr,
        port: 0,
        proto: 0,
        scope: ServiceScope::Cluster as u8,
    };
    SERVICES.get_ptr(&key).is_some()
}

/// The `cidr_kind` of the longest CIDRS prefix holding `addr`.
#[inline(always)]
pub fn cidr_kind_of(addr: &RawAddr) -> Option<u32> {
    let key = LpmKey::new(128, *addr);
    CIDRS.get(&key).copied()
}

/// May `src` use service `service_id` (loadBalancerSourceRanges)?
#[inline(always)]
pub fn source_allowed(service_id: u32, src: &RawAddr) -> bool {
    let key = LpmKey::new(
        160,
        SourceRange {
            service_id_be: service_id.to_be(),
            addr: *src,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}
