//! Counter updates. Per-CPU slots, so plain adds need no atomics.

use lb_common::{DropReason, FlowEvent, TrafficCounter};

use crate::maps::{BACKEND_STATS, DROP_STATS, EVENT_STATS, SERVICE_STATS};

#[inline(always)]
fn add(counter: Option<*mut TrafficCounter>, bytes: u32) {
    if let Some(c) = counter {
        // SAFETY: per-CPU array slot of this CPU; nothing else writes it now.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn count_balanced(service_id: u32, backend_id: u32, bytes: u32) {
    add(SERVICE_STATS.get_ptr_mut(service_id), bytes);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes);
}

#[inline(always)]
fn increment(counter: Option<*mut u64>) {
    if let Some(c) = counter {
        // SAFETY: as above.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    increment(DROP_STATS.get_ptr_mut(reason as u32));
}

#[inline(always)]
pub fn count_event(event: FlowEvent) {
    increment(EVENT_STATS.get_ptr_mut(event as u32));
}
