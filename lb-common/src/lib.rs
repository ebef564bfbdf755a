//! Types shared by the kernel programs (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Every map key and value is `#[repr(C)]`, has no implicit padding (explicit
//! `_pad` fields instead, asserted at compile time) and carries no `bool` or
//! `Option`, so the same bytes mean the same thing on both sides and
//! `bpftool map dump` prints every field by name from BTF.
//!
//! Addresses are 16 bytes in every key: IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so IPv6 needs no second set of maps. Addresses are the
//! packet's bytes; ports are in host byte order, so `bpftool map dump` shows
//! `"port": 8080`.
#![no_std]

pub mod addr;
pub mod backend;
pub mod conntrack;
pub mod sctp;
pub mod service;
pub mod sock;
pub mod stats;

pub use addr::RawAddr;
pub use backend::{Backend, BackendId, BackendSlotKey};
pub use conntrack::{CtEntry, CtKey, CtKind, CtState};
pub use service::{
    AffinityKey, AffinityValue, ServiceKey, ServiceScope, ServiceValue, SourceRange, cidr_kind, svc_flags,
};
pub use stats::{DropReason, FlowEvent, TrafficCounter};

/// IP protocol numbers used in keys.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMP: u8 = 1;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Map names, shared so the agent finds what the kernel object declares.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const DROP_STATS: &str = "DROP_STATS";
    pub const EVENT_STATS: &str = "EVENT_STATS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const CIDRS: &str = "CIDRS";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const CONFIG: &str = "CONFIG";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const MAGLEV: &str = "MAGLEV";
    pub const XDP_EGRESS: &str = "XDP_EGRESS";
    pub const ALL: [&str; 15] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        CONNTRACK,
        SERVICE_STATS,
        BACKEND_STATS,
        DROP_STATS,
        EVENT_STATS,
        AFFINITY,
        CIDRS,
        SOURCE_RANGES,
        CONFIG,
        SOCK_REVNAT,
        MAGLEV,
        XDP_EGRESS,
    ];

    /// Not pinned: the previous agent's CONNTRACK while it is migrated (see
    /// lb-ebpf's maps.rs).
    pub const CONNTRACK_PREV: &str = "CONNTRACK_PREV";

    /// Layout version of map `name`'s keys and values: part of what a
    /// pinned map must match to be reused. The maps whose entries outlive an
    /// upgrade (CONNTRACK, AFFINITY, SOCK_REVNAT) have theirs next to their
    /// types; the others are rebuilt by the agent and share `REBUILT_LAYOUT_VERSION`.
    pub fn layout_version(name: &str) -> u32 {
        match name {
            CONNTRACK => crate::conntrack::CT_LAYOUT_VERSION,
            AFFINITY => crate::service::AFFINITY_LAYOUT_VERSION,
            SOCK_REVNAT => crate::sock::SOCK_REVNAT_LAYOUT_VERSION,
            _ => REBUILT_LAYOUT_VERSION,
        }
    }

    /// Layout version of the maps the agent fills from its model or settings
    /// (services, backends, CIDRs, config, counters): bumped on a change of
    /// their types' meaning that their sizes do not show.
    pub const REBUILT_LAYOUT_VERSION: u32 = 1;
}

/// Map capacities. Ids index the per-CPU counter arrays, so they stay below
/// the matching maximum.
pub mod limits {
    /// Service ports (one per VIP:port/protocol), like one KUBE-SVC chain each.
    pub const MAX_SERVICES: u32 = 65_536;
    /// Backends over all services (one per service port × endpoint, like
    /// KUBE-SEP): room for 10,000 services of 10+ endpoints.
    pub const MAX_BACKENDS: u32 = 262_144;
    /// Backend slots over all services; two revisions of a service coexist
    /// while it is being swapped, hence the headroom over `MAX_BACKENDS`.
    pub const MAX_BACKEND_SLOTS: u32 = 524_288;
    /// Backends one service port may have.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 4_096;
    /// Default conntrack size (forward + reply entries); `--conntrack-max` overrides it.
    pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
    /// ClientIP affinity entries (client × service port), LRU.
    pub const MAX_AFFINITY: u32 = 65_536;
    /// Cluster and service CIDRs (a few per family).
    pub const MAX_CIDRS: u32 = 64;
    /// loadBalancerSourceRanges CIDRs over all services.
    pub const MAX_SOURCE_RANGES: u32 = 16_384;
    /// Sockets of host processes connected through a service (LRU).
    pub const MAX_SOCK_REVNAT: u32 = 65_536;
    /// Cilium's default Maglev table size (prime); `--maglev-table-size`.
    pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;
    /// Interfaces the XDP path may send frames out of.
    pub const MAX_XDP_EGRESS: u32 = 256;
    /// Number of drop-reason counters (`DropReason` discriminants are below it).
    pub const DROP_REASONS: u32 = 16;
    /// Number of event counters (`FlowEvent` discriminants are below it).
    pub const FLOW_EVENTS: u32 = 8;
}

/// Compile-time assertion that a map type has exactly the expected size.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain integers/arrays with no padding
    // (sizes asserted next to each definition).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for TrafficCounter {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for sock::NodeConfig {}
    unsafe impl aya::Pod for sock::SockRevNat {}
    unsafe impl aya::Pod for sock::SockNatKey {}
}
