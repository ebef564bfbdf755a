//! Masquerade port choice (KUBE-POSTROUTING MASQUERADE --random-fully): a
//! random port of the SNAT range whose reply tuple is free, claimed by
//! inserting the flow's reply conntrack entry.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use lb_common::{CtEntry, DropReason, RawAddr, conntrack::snat_ports};

use crate::{conntrack, maps::CONNTRACK};

/// Claims a port for a flow to `backend` masqueraded as `node_addr` by
/// inserting `reply` under the port's reply key. Expired entries are
/// reclaimed; a range full for this backend drops the flow (counted).
#[inline(always)]
pub fn claim_port(
    backend: &RawAddr,
    backend_port: u16,
    node_addr: &RawAddr,
    proto: u8,
    reply: &CtEntry,
    now: u32,
) -> Result<u16, DropReason> {
    let key = conntrack::key_slot().ok_or(DropReason::ConntrackInsert)?;
    for _ in 0..snat_ports::TRIES {
        // SAFETY: plain helper call.
        let port = snat_ports::nth(unsafe { bpf_get_prandom_u32() } % snat_ports::COUNT);
        conntrack::set_reply_key(&mut *key, backend, backend_port, node_addr, port, proto);
        if CONNTRACK.insert(&*key, reply, BPF_NOEXIST as u64).is_ok() {
            return Ok(port);
        }
        // Taken; an expired holder gives it up.
        // SAFETY: copied out at once.
        if let Some(old) = unsafe { CONNTRACK.get(&*key) }
            && old.expires_at < now
            && CONNTRACK.insert(&*key, reply, 0).is_ok()
        {
            return Ok(port);
        }
    }
    Err(DropReason::SnatPortsExhausted)
}
