//! Typed access to the datapath maps, from a loaded object or from pins.

use std::path::Path;

use anyhow::Context;
use aya::{
    Ebpf,
    maps::{
        Array, DevMapHash, HashMap, HashOfMaps, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendId, BackendSlotKey, CtEntry, CtKey, CtKind, DropReason, FlowEvent,
    RawAddr, ServiceKey, ServiceValue, SourceRange, TrafficCounter, map_names, proto,
    sock::{NodeConfig, SockNatKey, SockRevNat},
};

use crate::model::Cidr;
use crate::sync::{DatapathMaps, MapOpError, raw_addr};

/// Inner maps of MAGLEV may have their own size (the table size flag).
const BPF_F_INNER_MAP: u32 = 1 << 12;

fn source_range_key(service_id: u32, range: &Cidr) -> LpmKey<SourceRange> {
    LpmKey::new(
        32 + lpm_bits(range),
        SourceRange {
            service_id_be: service_id.to_be(),
            addr: raw_addr(range.addr),
        },
    )
}

pub struct BpfMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, BackendSlotKey, BackendId>,
    pub backends: HashMap<MapData, BackendId, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub sock_revnat: HashMap<MapData, SockNatKey, SockRevNat>,
    pub service_stats: PerCpuArray<MapData, TrafficCounter>,
    pub backend_stats: PerCpuArray<MapData, TrafficCounter>,
    pub drop_stats: PerCpuArray<MapData, u64>,
    pub event_stats: PerCpuArray<MapData, u64>,
    pub cidrs: LpmTrie<MapData, RawAddr, u32>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u32>,
    pub config: Array<MapData, NodeConfig>,
    pub maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    pub xdp_egress: DevMapHash<MapData>,
}

/// LPM prefix length of a CIDR over a 16-byte (IPv4-mapped) address.
fn lpm_bits(cidr: &Cidr) -> u32 {
    if cidr.addr.is_ipv4() {
        96 + cidr.prefix as u32
    } else {
        cidr.prefix as u32
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

fn from_pin(root: &Path, name: &str) -> anyhow::Result<Map> {
    from_pin_path(&root.join(name))
}

pub(super) fn from_pin_path(path: &Path) -> anyhow::Result<Map> {
    let data = MapData::from_pin(path).with_context(|| {
        format!(
            "opening pinned map {} (is an agent running with this --bpf-root?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

/// Conntrack lifetimes in seconds (the --conntrack-*-timeout flags; 0:
/// the datapath's `ct_timeouts` default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_close_wait: u32,
    pub tcp_closing: u32,
    pub udp: u32,
    pub udp_stream: u32,
}

/// XDP_EGRESS entries that could not be written.
#[derive(Debug, thiserror::Error)]
#[error(
    "XDP_EGRESS: {} of {wanted} interfaces not written (capacity {}): {}",
    failed.len(),
    lb_common::limits::MAX_XDP_EGRESS,
    failed.iter().map(|(i, e)| format!("{i} {e}")).collect::<Vec<_>>().join("; ")
)]
pub struct XdpEgressError {
    /// (ifindex, what failed).
    pub failed: Vec<(u32, String)>,
    /// Interfaces the list should hold.
    pub wanted: usize,
}

impl BpfMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::build(|name| take(ebpf, name))
    }

    /// Opens the maps a running agent pinned under `root`.
    pub fn open_pinned(root: &Path) -> anyhow::Result<Self> {
        Self::build(|name| from_pin(root, name))
    }

    pub(super) fn build(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(BpfMaps {
            services: get(map_names::SERVICES)?.try_into()?,
            slots: get(map_names::BACKEND_SLOTS)?.try_into()?,
            backends: get(map_names::BACKENDS)?.try_into()?,
            conntrack: get(map_names::CONNTRACK)?.try_into()?,
            affinity: get(map_names::AFFINITY)?.try_into()?,
            sock_revnat: get(map_names::SOCK_REVNAT)?.try_into()?,
            service_stats: get(map_names::SERVICE_STATS)?.try_into()?,
            backend_stats: get(map_names::BACKEND_STATS)?.try_into()?,
            drop_stats: get(map_names::DROP_STATS)?.try_into()?,
            event_stats: get(map_names::EVENT_STATS)?.try_into()?,
            cidrs: get(map_names::CIDRS)?.try_into()?,
            source_ranges: get(map_names::SOURCE_RANGES)?.try_into()?,
            config: get(map_names::CONFIG)?.try_into()?,
            maglev: get(map_names::MAGLEV)?.try_into()?,
            xdp_egress: get(map_names::XDP_EGRESS)?.try_into()?,
        })
    }

    /// Sum over CPUs of a service's counters.
    pub fn service_counter(&self, id: u32) -> anyhow::Result<TrafficCounter> {
        sum_counters(self.service_stats.get(&id, 0)?)
    }

    pub fn backend_counter(&self, id: BackendId) -> anyhow::Result<TrafficCounter> {
        sum_counters(self.backend_stats.get(&id, 0)?)
    }

    /// Programs the cluster and service CIDRs (--cluster-cidr,
    /// --service-cluster-ip-range).
    pub fn set_cidrs(&mut self, cidrs: &[(Cidr, u32)]) -> Result<(), MapOpError> {
        for (cidr, kind) in cidrs {
            let key = LpmKey::new(lpm_bits(cidr), raw_addr(cidr.addr));
            self.cidrs
                .insert(&key, kind, 0)
                .map_err(op_err(map_names::CIDRS, "insert"))?;
        }
        Ok(())
    }

    /// Writes the whole CONFIG entry from the agent's settings, so nothing
    /// an earlier agent (or anyone) left in the pinned map survives a
    /// restart: every field is this agent's.
    pub fn write_node_config(
        &mut self,
        netns_cookie: u64,
        timeouts: &ConntrackTimeouts,
        stack_forwarding: bool,
    ) -> anyhow::Result<()> {
        let mut config = NodeConfig {
            netns_cookie,
            ..NodeConfig::default()
        };
        apply_timeouts(&mut config, timeouts);
        apply_stack_forwarding(&mut config, stack_forwarding);
        self.config.set(0, config, 0).context("writing CONFIG")?;
        Ok(())
    }

    /// Changes one part of CONFIG. An entry that cannot be read fails
    /// loudly rather than being taken as zeroes (which would silently
    /// reset the other settings).
    fn update_config(&mut self, change: impl FnOnce(&mut NodeConfig)) -> anyhow::Result<()> {
        let mut config = self.config.get(&0, 0).context(
            "reading CONFIG entry 0 (the node settings): the map is unusable; \
             run `lb-agent cleanup --bpf-root ...` and start the agent again",
        )?;
        change(&mut config);
        self.config.set(0, config, 0).context("writing CONFIG")?;
        Ok(())
    }

    /// Conntrack lifetimes (seconds; 0 keeps the datapath's default).
    pub fn set_conntrack_timeouts(&mut self, t: &ConntrackTimeouts) -> anyhow::Result<()> {
        self.update_config(|c| apply_timeouts(c, t))
    }

    /// Stack forwarding mode on or off (`--forwarding-mode`).
    pub fn set_stack_forwarding(&mut self, on: bool) -> anyhow::Result<()> {
        self.update_config(|c| apply_stack_forwarding(c, on))
    }

    /// Deletes expired conntrack entries (`now`: the datapath's clock, in
    /// seconds); returns how many. The LRU evicts under pressure anyway;
    /// this keeps the table and `lb-agent conntrack` clean.
    pub fn purge_expired_conntrack(&mut self, now: u32) -> Result<usize, MapOpError> {
        let stale: Vec<CtKey> = dump(&self.conntrack, map_names::CONNTRACK)?
            .into_iter()
            .filter(|(_, e)| e.expires_at < now)
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            ignore_missing(self.conntrack.remove(key)).map_err(op_err(map_names::CONNTRACK, "delete"))?;
        }
        Ok(stale.len())
    }

    /// kube-proxy's CleanStaleEntries: deletes the UDP conntrack entries
    /// (both directions) of these service ports whose backend address is
    /// not one of the port's serving addresses, so those flows start afresh
    /// on a serving endpoint. TCP entries are never touched: established
    /// connections to a retired endpoint end on their own. Returns how many
    /// entries went.
    pub fn clear_stale_udp_flows(&mut self, serving: &crate::sync::StaleUdpFlows) -> Result<usize, MapOpError> {
        if serving.is_empty() {
            return Ok(0);
        }
        let stale: Vec<CtKey> = dump(&self.conntrack, map_names::CONNTRACK)?
            .into_iter()
            .filter(|(key, entry)| {
                // The backend is the forward entry's DNAT target and the
                // reply entry's source.
                let backend = if key.kind == CtKind::Forward as u8 {
                    &entry.nat_addr
                } else {
                    &key.src_addr
                };
                key.proto == proto::UDP
                    && serving
                        .get(&entry.service_id)
                        .is_some_and(|addrs| !addrs.contains(backend))
            })
            .map(|(key, _)| key)
            .collect();
        for key in &stale {
            ignore_missing(self.conntrack.remove(key)).map_err(op_err(map_names::CONNTRACK, "delete"))?;
        }
        Ok(stale.len())
    }

    /// (map, entries, capacity) of the hash maps, for fill-ratio metrics.
    pub fn fill(&self) -> Vec<(&'static str, usize, u32)> {
        fn count<K: aya::Pod, V: aya::Pod>(m: &HashMap<MapData, K, V>) -> usize {
            m.keys().filter(Result::is_ok).count()
        }
        use aya::maps::IterableMap as _;
        let cap = |m: &MapData| m.info().map(|i| i.max_entries()).unwrap_or(0);
        vec![
            (map_names::SERVICES, count(&self.services), cap(self.services.map())),
            (map_names::BACKENDS, count(&self.backends), cap(self.backends.map())),
            (map_names::BACKEND_SLOTS, count(&self.slots), cap(self.slots.map())),
            (map_names::CONNTRACK, count(&self.conntrack), cap(self.conntrack.map())),
        ]
    }

    /// Makes XDP_EGRESS exactly `ifindexes`: the devices the XDP path may
    /// send frames out of. Best effort: every entry that can be written is
    /// (stale ones removed first, freeing room); the error lists the rest —
    /// interfaces gone before their insert (pod churn), more interfaces than
    /// the map holds — for the caller to sort out, log and count.
    pub fn set_xdp_egress(&mut self, ifindexes: &[u32]) -> Result<(), XdpEgressError> {
        let current: Vec<u32> = self.xdp_egress.keys().filter_map(Result::ok).collect();
        let mut failed = Vec::new();
        for &k in current.iter().filter(|k| !ifindexes.contains(k)) {
            if let Err(e) = ignore_missing(self.xdp_egress.remove(k)) {
                failed.push((k, format!("removing: {:#}", anyhow::Error::from(e))));
            }
        }
        for &k in ifindexes.iter().filter(|k| !current.contains(k)) {
            if let Err(e) = self.xdp_egress.insert(k, k, None, 0) {
                failed.push((k, format!("adding: {:#}", anyhow::Error::from(e))));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(XdpEgressError {
                failed,
                wanted: ifindexes.len(),
            })
        }
    }

    pub fn drops(&self, reason: DropReason) -> anyhow::Result<u64> {
        Ok(self.drop_stats.get(&(reason as u32), 0)?.iter().sum())
    }

    pub fn events(&self, event: FlowEvent) -> anyhow::Result<u64> {
        Ok(self.event_stats.get(&(event as u32), 0)?.iter().sum())
    }
}

fn apply_timeouts(config: &mut NodeConfig, t: &ConntrackTimeouts) {
    config.tcp_syn_timeout = t.tcp_syn;
    config.tcp_established_timeout = t.tcp_established;
    config.tcp_close_wait_timeout = t.tcp_close_wait;
    config.tcp_closing_timeout = t.tcp_closing;
    config.udp_timeout = t.udp;
    config.udp_stream_timeout = t.udp_stream;
}

fn apply_stack_forwarding(config: &mut NodeConfig, on: bool) {
    use lb_common::sock::config_flags::STACK_FORWARDING;
    config.flags = if on {
        config.flags | STACK_FORWARDING
    } else {
        config.flags & !STACK_FORWARDING
    };
}

fn sum_counters(values: PerCpuValues<TrafficCounter>) -> anyhow::Result<TrafficCounter> {
    Ok(values.iter().fold(TrafficCounter::default(), |acc, c| TrafficCounter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    }))
}

fn op_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapOpError {
    move |e| {
        let message = match &e {
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                let flag = match map {
                    map_names::SERVICES | map_names::SERVICE_STATS => "raise --max-services",
                    map_names::BACKENDS | map_names::BACKEND_SLOTS | map_names::BACKEND_STATS => "raise --max-backends",
                    map_names::CONNTRACK => "raise --conntrack-max",
                    _ => "the map size is fixed",
                };
                format!("map is full: {flag} ({e})")
            }
            _ => e.to_string(),
        };
        MapOpError { map, op, message }
    }
}

/// Deleting what is already gone is fine.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn zeroed_per_cpu<T: aya::Pod + Default>(map: &'static str) -> Result<PerCpuValues<T>, MapOpError> {
    let err = |message: String| MapOpError {
        map,
        op: "reset",
        message,
    };
    let n = aya::util::nr_cpus().map_err(|(what, e)| err(format!("{what}: {e}")))?;
    PerCpuValues::try_from(vec![T::default(); n]).map_err(|e| err(e.to_string()))
}

/// Every entry. An entry deleted between listing and reading is skipped.
pub fn dump<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapOpError> {
    let mut out = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok(kv) => out.push(kv),
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(op_err(name, "iterate")(e)),
        }
    }
    Ok(out)
}

impl DatapathMaps for BpfMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapOpError> {
        self.services
            .insert(key, value, 0)
            .map_err(op_err(map_names::SERVICES, "insert"))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapOpError> {
        ignore_missing(self.services.remove(key)).map_err(op_err(map_names::SERVICES, "delete"))
    }
    fn put_slot(&mut self, key: &BackendSlotKey, id: BackendId) -> Result<(), MapOpError> {
        self.slots
            .insert(key, id, 0)
            .map_err(op_err(map_names::BACKEND_SLOTS, "insert"))
    }
    fn delete_slot(&mut self, key: &BackendSlotKey) -> Result<(), MapOpError> {
        ignore_missing(self.slots.remove(key)).map_err(op_err(map_names::BACKEND_SLOTS, "delete"))
    }
    fn put_backend(&mut self, id: BackendId, backend: &Backend) -> Result<(), MapOpError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(op_err(map_names::BACKENDS, "insert"))
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), MapOpError> {
        ignore_missing(self.backends.remove(&id)).map_err(op_err(map_names::BACKENDS, "delete"))
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<(), MapOpError> {
        let zero = zeroed_per_cpu(map_names::SERVICE_STATS)?;
        self.service_stats
            .set(id, zero, 0)
            .map_err(op_err(map_names::SERVICE_STATS, "reset"))
    }
    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), MapOpError> {
        let zero = zeroed_per_cpu(map_names::BACKEND_STATS)?;
        self.backend_stats
            .set(id, zero, 0)
            .map_err(op_err(map_names::BACKEND_STATS, "reset"))
    }
    fn put_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), MapOpError> {
        let key = source_range_key(service_id, range);
        self.source_ranges
            .insert(&key, 1, 0)
            .map_err(op_err(map_names::SOURCE_RANGES, "insert"))
    }
    fn delete_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), MapOpError> {
        let key = source_range_key(service_id, range);
        ignore_missing(self.source_ranges.remove(&key)).map_err(op_err(map_names::SOURCE_RANGES, "delete"))
    }
    fn put_maglev(&mut self, service_id: u32, table: &[BackendId]) -> Result<(), MapOpError> {
        let err = op_err(map_names::MAGLEV, "insert");
        // A fresh inner array, filled, then swapped in whole.
        let mut inner: Array<MapData, u32> =
            Array::create(table.len() as u32, BPF_F_INNER_MAP).map_err(op_err(map_names::MAGLEV, "create"))?;
        for (i, id) in table.iter().enumerate() {
            inner.set(i as u32, id, 0).map_err(op_err(map_names::MAGLEV, "fill"))?;
        }
        self.maglev.insert(service_id, &inner, 0).map_err(err)
    }
    fn delete_maglev(&mut self, service_id: u32) -> Result<(), MapOpError> {
        ignore_missing(self.maglev.remove(&service_id)).map_err(op_err(map_names::MAGLEV, "delete"))
    }
    fn dump_source_ranges(&self) -> Result<Vec<(u32, Cidr)>, MapOpError> {
        let mut out = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(op_err(map_names::SOURCE_RANGES, "iterate"))?;
            let data = key.data();
            let ip = crate::inspect::ip_of(&data.addr);
            let bits = key.prefix_len() - 32;
            let prefix = if ip.is_ipv4() { bits.saturating_sub(96) } else { bits } as u8;
            out.push((u32::from_be(data.service_id_be), Cidr { addr: ip, prefix }));
        }
        Ok(out)
    }
    fn dump_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapOpError> {
        dump(&self.services, map_names::SERVICES)
    }
    fn dump_slots(&self) -> Result<Vec<(BackendSlotKey, BackendId)>, MapOpError> {
        dump(&self.slots, map_names::BACKEND_SLOTS)
    }
    fn dump_backends(&self) -> Result<Vec<(BackendId, Backend)>, MapOpError> {
        dump(&self.backends, map_names::BACKENDS)
    }
}
