//! Every map of the datapath, in one place. Keys and values are the
//! `lb-common` types; `#[btf_map]` gives them BTF so `bpftool map dump`
//! prints field names. Sizes are the named constants of `lb_common::limits`
//! (CONNTRACK's is overridden by the agent's `--conntrack-max`).

use crate::parse::Packet;
use aya_ebpf::{
    bindings::BPF_F_INNER_MAP,
    btf_maps::{Array, DevMapHash, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendId, BackendSlotKey, CtEntry, CtKey, RawAddr, ServiceKey, ServiceValue,
    SourceRange, TrafficCounter,
    limits::{
        DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_TABLE_SIZE, DROP_REASONS, FLOW_EVENTS, MAX_AFFINITY,
        MAX_BACKEND_SLOTS, MAX_BACKENDS, MAX_CIDRS, MAX_SERVICES, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES, MAX_XDP_EGRESS,
    },
    sock::{NodeConfig, SockNatKey, SockRevNat},
};

/// (VIP, port, protocol, scope) → service port entry: KUBE-SERVICES.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// (service id, revision, slot) → backend id: the KUBE-SVC-* random pick
/// table, one complete list per revision.
#[btf_map]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, BackendId, { MAX_BACKEND_SLOTS as usize }> = HashMap::new();

/// Backend id → endpoint address and port: the KUBE-SEP-* DNAT targets.
#[btf_map]
pub static BACKENDS: HashMap<BackendId, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

/// Flow → NAT state, forward and reply entries; LRU so a full table evicts
/// the oldest flow instead of refusing new ones.
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, { DEFAULT_CONNTRACK_ENTRIES as usize }> = LruHashMap::new();

/// Slot 0 → the previous agent's CONNTRACK while the agent migrates it
/// into a new one (another size or layout), empty otherwise. Until every
/// interface runs the new programs, flows are known to one table or the
/// other: a miss in CONNTRACK is looked up here (and copied over), and new
/// entries are written here too, for the old programs still attached.
#[btf_map]
pub static CONNTRACK_PREV: HashOfMaps<u32, LruHashMap<CtKey, CtEntry, 1024>, 1> = HashOfMaps::new();

/// (client, service id) → backend and last use: ClientIP session affinity
/// (kube-proxy's `recent` match); LRU, stale entries age out by timeout.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY as usize }> = LruHashMap::new();

/// Cluster CIDRs (sources not masqueraded) and service CIDRs (addresses
/// dropped when no service has them) → `cidr_kind`.
#[btf_map]
pub static CIDRS: LpmTrie<RawAddr, u32, { MAX_CIDRS as usize }> = LpmTrie::new();

/// (service id, source CIDR) → 1: loadBalancerSourceRanges of frontends
/// flagged `SOURCE_RANGES`.
#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

/// One conntrack entry of scratch space per CPU: a new flow's entries are
/// built here, off the 512-byte BPF stack.
#[btf_map]
pub static SCRATCH: PerCpuArray<CtEntry, 1> = PerCpuArray::new();

/// One conntrack key of scratch space per CPU: keys of new entries are
/// built here (40 bytes the stack of the new-flow path cannot spare).
#[btf_map]
pub static SCRATCH_KEY: PerCpuArray<CtKey, 1> = PerCpuArray::new();

/// The packet being processed, parsed (per CPU): off the 512-byte stack,
/// which every BPF function of a call chain shares.
#[btf_map]
pub static PACKET: PerCpuArray<Packet, 1> = PerCpuArray::new();

/// Node settings for the socket hooks (one entry).
#[btf_map]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// (socket cookie, frontend) → backend chosen for it, and (socket cookie,
/// backend) → frontend to show again: host sockets translated by the
/// connect/sendmsg hooks; LRU, so closed sockets age out.
#[btf_map]
pub static SOCK_REVNAT: LruHashMap<SockNatKey, SockRevNat, { MAX_SOCK_REVNAT as usize }> = LruHashMap::new();

/// Service id → its Maglev table (an array of backend ids indexed by flow
/// hash % size), swapped whole by the agent on every change.
#[btf_map]
pub static MAGLEV: HashOfMaps<
    u32,
    Array<u32, { DEFAULT_MAGLEV_TABLE_SIZE as usize }, { BPF_F_INNER_MAP as usize }>,
    { MAX_SERVICES as usize },
> = HashOfMaps::new();

/// Service id → packets/bytes balanced (per CPU).
#[btf_map]
pub static SERVICE_STATS: PerCpuArray<TrafficCounter, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Backend id → packets/bytes sent to it (per CPU).
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounter, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// DropReason → packets dropped for it (per CPU).
#[btf_map]
pub static DROP_STATS: PerCpuArray<u64, { DROP_REASONS as usize }> = PerCpuArray::new();

/// FlowEvent → times it happened (per CPU): counted, not dropped.
#[btf_map]
pub static EVENT_STATS: PerCpuArray<u64, { FLOW_EVENTS as usize }> = PerCpuArray::new();

/// Ifindex → that device: where the XDP path may send translated frames
/// (XDP_REDIRECT, also back out of the ingress device). The agent
/// lists only devices that take XDP frames (see `--xdp-mode`); a flow whose
/// next hop is elsewhere goes to the TC path.
#[btf_map]
pub static XDP_EGRESS: DevMapHash<{ MAX_XDP_EGRESS as usize }> = DevMapHash::new();
