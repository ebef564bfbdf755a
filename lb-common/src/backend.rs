//! BACKEND_SLOTS and BACKENDS maps: the `KUBE-SVC-*` random pick and the
//! `KUBE-SEP-*` DNAT targets.

use crate::{RawAddr, assert_size};

/// Backend ids are per service port and endpoint (one per KUBE-SEP chain),
/// index BACKEND_STATS, and are never 0.
pub type BackendId = u32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub revision: u32,
    pub slot: u32,
}
assert_size!(BackendSlotKey, 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Endpoint address (IPv4-mapped for IPv4).
    pub addr: RawAddr,
    /// Endpoint (target) port, host byte order.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    pub _pad: u8,
    /// Service port this backend belongs to: a conntrack entry only keeps
    /// using a backend that still belongs to its service.
    pub service_id: u32,
}
assert_size!(Backend, 24);
