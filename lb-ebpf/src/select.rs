//! Service lookup and backend choice: KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    Backend, BackendId, BackendSlotKey, DropReason, ServiceKey, ServiceScope, ServiceValue, addr::from_v4_word,
};

use crate::{
    maps::{BACKEND_SLOTS, BACKENDS, SERVICES},
    parse::Packet,
};

#[inline(always)]
pub fn lookup_service(pkt: &Packet) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: from_v4_word(pkt.dst),
        port: pkt.dport,
        proto: pkt.proto,
        scope: ServiceScope::Cluster as u8,
    };
    // SAFETY: copied out at once; the agent replaces values, never edits them in place.
    unsafe { SERVICES.get(&key).copied() }
}

/// Uniform random pick among the live revision's slots (the iptables
/// `statistic mode random` cascade gives each of n endpoints 1/n).
#[inline(always)]
pub fn pick_backend(svc: &ServiceValue) -> Result<(BackendId, Backend), DropReason> {
    if svc.backend_count == 0 {
        return Err(DropReason::NoBackend);
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count;
    let key = BackendSlotKey {
        service_id: svc.service_id,
        revision: svc.revision,
        slot,
    };
    // SAFETY: values are copied out at once.
    let id = unsafe { BACKEND_SLOTS.get(&key).copied() }.ok_or(DropReason::BackendSlotMissing)?;
    let backend = lookup_backend(id).ok_or(DropReason::BackendSlotMissing)?;
    Ok((id, backend))
}

#[inline(always)]
pub fn lookup_backend(id: BackendId) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(&id).copied() }
}
