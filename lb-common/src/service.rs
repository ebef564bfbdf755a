//! SERVICES map: (VIP, port, protocol, scope) → service entry. Replaces the
//! `KUBE-SERVICES` match on ClusterIP:port.

use crate::{RawAddr, assert_size};

/// Which traffic a SERVICES entry serves (Cilium's scope idea). Every
/// frontend has a `Cluster` entry, the one packets find first (NodePort,
/// external and LoadBalancer addresses are entries of their own address,
/// with their own backend set and flags). An externalTrafficPolicy Local
/// frontend also has an `Internal` entry at the same address, port and
/// protocol: all of the service's endpoints, for sources inside the
/// cluster (kube-proxy's KUBE-EXT short-circuit to the cluster policy chain).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceScope {
    Cluster = 0,
    /// Sources in the cluster CIDR and the node itself (socket hooks).
    Internal = 1,
}

/// `ServiceValue::flags`.
pub mod svc_flags {
    /// Masquerade every new flow (external traffic with
    /// externalTrafficPolicy Cluster, or --masquerade-all): KUBE-MARK-MASQ.
    pub const SNAT_ALWAYS: u32 = 1 << 0;
    /// Masquerade sources outside the cluster CIDRs (--cluster-cidr).
    pub const SNAT_OUTSIDE_CLUSTER: u32 = 1 << 1;
    /// Only sources in SOURCE_RANGES may use this frontend
    /// (loadBalancerSourceRanges); others are dropped.
    pub const SOURCE_RANGES: u32 = 1 << 2;
    /// Not a frontend but an address marker (port 0, protocol 0): a cluster
    /// IP, so packets to its other ports are rejected.
    pub const ADDRESS_ONLY: u32 = 1 << 3;
    /// No local endpoint while the service has endpoints elsewhere (a Local
    /// traffic policy): drop, where a service without any endpoint is
    /// rejected — as kube-proxy does.
    pub const DROP_IF_EMPTY: u32 = 1 << 4;
    /// externalTrafficPolicy Local: sources in the cluster CIDR and the
    /// node's own sockets use this frontend's `ServiceScope::Internal`
    /// entry (all endpoints) instead: kube-proxy's short-circuit of pod
    /// and node traffic to external destinations.
    pub const IN_CLUSTER_USES_INTERNAL: u32 = 1 << 5;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Service VIP (IPv4-mapped for IPv4).
    pub addr: RawAddr,
    /// Service port, host byte order.
    pub port: u16,
    /// IP protocol (`proto::TCP`, `proto::UDP`).
    pub proto: u8,
    /// `ServiceScope` discriminant.
    pub scope: u8,
}
assert_size!(ServiceKey, 20);

/// Entry for one service port. The backend list lives in BACKEND_SLOTS under
/// `(service_id, revision, slot)`: the agent writes a complete new revision
/// first and then replaces this value in one map update, so a packet sees
/// either the old list or the new one, never half of either.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Stable id of this service port (indexes SERVICE_STATS); never 0.
    pub service_id: u32,
    /// Revision of the backend slot list that is live.
    pub revision: u32,
    /// Number of live slots (0: no usable endpoint).
    pub backend_count: u32,
    /// Reserved for per-service options (traffic policy, reject).
    pub flags: u32,
    /// ClientIP session affinity: seconds a client stays on its backend
    /// after its last new connection (0: no affinity).
    pub affinity_timeout: u32,
    /// Maglev: size of the service's MAGLEV table, indexed by a flow hash
    /// (0: uniform random pick from BACKEND_SLOTS).
    pub table_size: u32,
}
assert_size!(ServiceValue, 24);

/// What a CIDRS entry is. CIDRS is an LPM trie over `RawAddr` (IPv4
/// prefixes are 96 + their length, as addresses are IPv4-mapped).
pub mod cidr_kind {
    /// --cluster-cidr: pod addresses (sources not masqueraded).
    pub const CLUSTER: u32 = 1;
    /// --service-cluster-ip-range: an address here without a service is dropped.
    pub const SERVICE: u32 = 2;
}

/// SOURCE_RANGES map (LPM trie) key data: a loadBalancerSourceRanges CIDR of
/// one service port. The prefix length counts the 32 service-id bits too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRange {
    /// Service id, big-endian (LPM matches bytes in order).
    pub service_id_be: u32,
    pub addr: RawAddr,
}
assert_size!(SourceRange, 20);

/// AFFINITY map key: one client of one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: RawAddr,
    pub service_id: u32,
}
assert_size!(AffinityKey, 20);

/// The backend a client was last sent to, and when (monotonic seconds).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub last_used: u32,
}
assert_size!(AffinityValue, 8);

/// Layout version of AFFINITY's `AffinityKey`/`AffinityValue` (see
/// `conntrack::CT_LAYOUT_VERSION`).
pub const AFFINITY_LAYOUT_VERSION: u32 = 1;
