//! Sync: turns model changes into map writes.
//!
//! Order per service port, so the datapath never sees half a list:
//! backends first, then the complete slot list under a new revision, then
//! the SERVICES value that switches to it in one update, and only then the
//! old revision's slots and the removed backends. A removed backend only
//! leaves the choice of new flows: established flows keep it (their
//! conntrack entries hold its address), as under kube-proxy. UDP flows to
//! addresses that stopped *serving* are reported (`take_stale_udp_flows`)
//! for the caller to clear, like kube-proxy's CleanStaleEntries.
//!
//! If anything fails, the next sync is a full resync: every service port is
//! written again and map entries nobody owns are swept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use lb_common::{
    Backend, BackendId, BackendSlotKey, RawAddr, ServiceKey, ServiceScope, ServiceValue,
    limits::{MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES},
};
use tracing::{debug, info};

use crate::model::{Cidr, Endpoint, Frontend, Model, Protocol, ServicePort};
use crate::tracker::{self, ChangeSet};

/// A failed map operation, with the map's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} on map {map}: {message}")]
pub struct MapOpError {
    pub map: &'static str,
    pub op: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Map(#[from] MapOpError),
    #[error("{what} exhausted: all {limit} ids are in use ({hint})")]
    IdsExhausted {
        what: &'static str,
        limit: u32,
        hint: &'static str,
    },
    #[error("{service}: {count} endpoints exceed the limit of {limit} per service port")]
    TooManyEndpoints { service: String, count: usize, limit: u32 },
}

/// The map operations sync needs; the BPF maps implement it, and so does an
/// in-memory fake in the tests.
pub trait DatapathMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapOpError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapOpError>;
    fn put_slot(&mut self, key: &BackendSlotKey, id: BackendId) -> Result<(), MapOpError>;
    fn delete_slot(&mut self, key: &BackendSlotKey) -> Result<(), MapOpError>;
    fn put_backend(&mut self, id: BackendId, backend: &Backend) -> Result<(), MapOpError>;
    fn delete_backend(&mut self, id: BackendId) -> Result<(), MapOpError>;
    /// Zeroes the counters of a newly allocated service id.
    fn reset_service_stats(&mut self, id: u32) -> Result<(), MapOpError>;
    /// Zeroes the counters of a newly allocated backend id.
    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), MapOpError>;
    /// Replaces a service port's Maglev table (backend ids) in one update.
    fn put_maglev(&mut self, service_id: u32, table: &[BackendId]) -> Result<(), MapOpError>;
    fn delete_maglev(&mut self, service_id: u32) -> Result<(), MapOpError>;
    /// A loadBalancerSourceRanges CIDR of a service port.
    fn put_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), MapOpError>;
    fn delete_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), MapOpError>;
    /// Every (service id, source range) entry.
    fn dump_source_ranges(&self) -> Result<Vec<(u32, Cidr)>, MapOpError>;
    fn dump_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapOpError>;
    fn dump_slots(&self) -> Result<Vec<(BackendSlotKey, BackendId)>, MapOpError>;
    fn dump_backends(&self) -> Result<Vec<(BackendId, Backend)>, MapOpError>;
}

/// What the maps hold, read once for a full resync.
/// What the service, slot and backend maps hold: read whole for a full
/// resync (on another thread for the periodic one: see `resync_against`).
pub struct MapContents {
    services: HashMap<ServiceKey, ServiceValue>,
    slots: HashMap<BackendSlotKey, BackendId>,
    backends: HashMap<BackendId, Backend>,
}

impl MapContents {
    pub fn read(maps: &impl DatapathMaps) -> Result<Self, MapOpError> {
        Ok(MapContents {
            services: maps.dump_services()?.into_iter().collect(),
            slots: maps.dump_slots()?.into_iter().collect(),
            backends: maps.dump_backends()?.into_iter().collect(),
        })
    }
}

pub use lb_common::addr::from_ip as raw_addr;

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: raw_addr(f.ip),
        port: f.port,
        proto: f.protocol.ip_proto(),
        scope: f.scope as u8,
    }
}

/// Ids in `1..limit`, handed out next-fit so a freed id is reused as late as
/// possible (stale conntrack entries also check the backend's address).
#[derive(Debug)]
struct IdAllocator {
    limit: u32,
    next: u32,
    used: BTreeSet<u32>,
    /// Highest id ever handed out: ids above it were never used, so their
    /// counters are still zero.
    high_water: u32,
    what: &'static str,
    hint: &'static str,
}

impl IdAllocator {
    fn new(limit: u32, what: &'static str, hint: &'static str) -> Self {
        IdAllocator {
            limit,
            next: 1,
            used: BTreeSet::new(),
            high_water: 0,
            what,
            hint,
        }
    }

    /// A free id, and whether it was used before (its counters need zeroing).
    fn alloc(&mut self) -> Result<(u32, bool), SyncError> {
        if self.used.len() as u32 >= self.limit - 1 {
            return Err(SyncError::IdsExhausted {
                what: self.what,
                limit: self.limit - 1,
                hint: self.hint,
            });
        }
        loop {
            let id = self.next;
            self.next = if self.next + 1 >= self.limit { 1 } else { self.next + 1 };
            if self.used.insert(id) {
                let reused = id <= self.high_water;
                self.high_water = self.high_water.max(id);
                return Ok((id, reused));
            }
        }
    }

    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }

    /// Marks an id found in the maps as taken (its counters are live).
    fn reserve(&mut self, id: u32) {
        if id > 0 && id < self.limit {
            self.used.insert(id);
            self.high_water = self.high_water.max(id);
            self.next = self.high_water.saturating_add(1).min(self.limit - 1).max(1);
        }
    }
}

/// What is in the maps for one service port.
#[derive(Debug, Clone)]
struct Programmed {
    service_id: u32,
    revision: u32,
    slot_count: u32,
    affinity_timeout: u32,
    flags: u32,
    /// Maglev table size (0: random pick).
    table_size: u32,
    source_ranges: Vec<Cidr>,
    backends: BTreeMap<Endpoint, BackendId>,
}

fn backend_value(ep: &Endpoint, proto: u8, service_id: u32) -> Backend {
    Backend {
        addr: raw_addr(ep.ip),
        port: ep.port,
        proto,
        _pad: 0,
        service_id,
    }
}

impl Programmed {
    fn value(&self) -> ServiceValue {
        ServiceValue {
            service_id: self.service_id,
            revision: self.revision,
            backend_count: self.slot_count,
            flags: self.flags,
            affinity_timeout: self.affinity_timeout,
            table_size: self.table_size,
        }
    }

    /// Do the maps hold exactly this service port as `sp` wants it?
    fn is_in(&self, actual: &MapContents, sp: &ServicePort) -> bool {
        let proto = sp.frontend.protocol.ip_proto();
        self.backends.len() == sp.endpoints.len()
            && self.affinity_timeout == sp.affinity_timeout
            && self.flags == sp.flags
            && self.table_size == if sp.endpoints.is_empty() { 0 } else { sp.table_size }
            && self.source_ranges == sp.source_ranges
            && actual.services.get(&service_key(&sp.frontend)) == Some(&self.value())
            && self.backends.iter().enumerate().all(|(slot, (ep, id))| {
                sp.endpoints.contains(ep)
                    && actual.slots.get(&BackendSlotKey {
                        service_id: self.service_id,
                        revision: self.revision,
                        slot: slot as u32,
                    }) == Some(id)
                    && actual.backends.get(id) == Some(&backend_value(ep, proto, self.service_id))
            })
    }
}

/// UDP service ports to clear stale flows of: service id → the addresses
/// of their serving endpoints (flows to any other address go).
pub type StaleUdpFlows = BTreeMap<u32, BTreeSet<RawAddr>>;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub upserted: usize,
    pub removed: usize,
    pub full: bool,
}

pub struct Syncer {
    applied: Model,
    programmed: BTreeMap<Frontend, Programmed>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    needs_full_resync: bool,
    /// UDP service ports whose conntrack entries must be checked since the
    /// last `take_stale_udp_flows`: service id → serving addresses.
    stale_udp: StaleUdpFlows,
    /// Cluster IPs with an address marker in SERVICES.
    markers: BTreeSet<IpAddr>,
}

/// SERVICES key of a cluster IP's address marker (port 0, protocol 0).
pub fn marker_key(ip: IpAddr) -> ServiceKey {
    ServiceKey {
        addr: raw_addr(ip),
        port: 0,
        proto: 0,
        scope: ServiceScope::Cluster as u8,
    }
}

const MARKER_VALUE: ServiceValue = ServiceValue {
    service_id: 0,
    revision: 0,
    backend_count: 0,
    flags: lb_common::svc_flags::ADDRESS_ONLY,
    affinity_timeout: 0,
    table_size: 0,
};

impl Default for Syncer {
    fn default() -> Self {
        Self::new()
    }
}

impl Syncer {
    pub fn new() -> Self {
        Self::with_limits(MAX_SERVICES, MAX_BACKENDS)
    }

    /// A syncer for maps of these capacities (`--max-services`, `--max-backends`).
    pub fn with_limits(max_services: u32, max_backends: u32) -> Self {
        Syncer {
            applied: Model::default(),
            programmed: BTreeMap::new(),
            service_ids: IdAllocator::new(max_services, "service ids", "raise --max-services"),
            backend_ids: IdAllocator::new(max_backends, "backend ids", "raise --max-backends"),
            needs_full_resync: true,
            stale_udp: StaleUdpFlows::new(),
            markers: BTreeSet::new(),
        }
    }

    /// Brings the maps to `model`. The first sync, and any sync after a
    /// failure, is a full resync.
    pub fn sync(&mut self, maps: &mut impl DatapathMaps, model: &Model) -> Result<SyncReport, SyncError> {
        let full = self.needs_full_resync;
        self.sync_with(maps, model, full, None)
    }

    /// A full resync against `actual`, what the maps held when it was read
    /// — possibly a while ago: the periodic resync reads the maps on
    /// another thread while changes keep being applied, so the (slow)
    /// read never holds them up. An older read is still safe to repair
    /// from: every service port that differs from what is programmed now
    /// is written again from the current model (idempotent), and only
    /// entries that nothing programmed now owns are deleted — an entry
    /// written after the read is not in it, so it is never swept.
    pub fn resync_against(
        &mut self,
        maps: &mut impl DatapathMaps,
        model: &Model,
        actual: MapContents,
    ) -> Result<SyncReport, SyncError> {
        self.sync_with(maps, model, true, Some(actual))
    }

    fn sync_with(
        &mut self,
        maps: &mut impl DatapathMaps,
        model: &Model,
        full: bool,
        actual: Option<MapContents>,
    ) -> Result<SyncReport, SyncError> {
        let result = if full {
            self.full_resync(maps, model, actual)
        } else {
            self.apply(maps, tracker::changes(&self.applied, model), false)
        }
        .and_then(|report| self.sync_markers(maps, model, full).map(|()| report));
        match result {
            Ok(mut report) => {
                self.note_stale_udp_flows(model, full);
                self.applied = model.clone();
                self.needs_full_resync = false;
                report.full = full;
                Ok(report)
            }
            Err(e) => {
                self.needs_full_resync = true;
                Err(e)
            }
        }
    }

    /// `rewrite_all`: write every backend of the upserted ports, not only new ones.
    fn apply(
        &mut self,
        maps: &mut impl DatapathMaps,
        changes: ChangeSet,
        rewrite_all: bool,
    ) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        let mut first_error = None;
        for f in &changes.removed {
            self.remove(maps, f)?;
            report.removed += 1;
        }
        // One bad service port must not stop the others from being programmed.
        for sp in &changes.upserted {
            match self.upsert(maps, sp, rewrite_all) {
                Ok(()) => report.upserted += 1,
                Err(e) => {
                    tracing::error!(service = %sp.name, frontend = %sp.frontend, "programming failed: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(report), Err)
    }

    /// Takes over what an earlier agent left in pinned maps: its service
    /// ports, ids and revisions become this syncer's, so the first (full)
    /// sync rewrites only what changed and established flows keep the
    /// backend ids their conntrack entries name. Returns the service ports.
    pub fn adopt(&mut self, maps: &impl DatapathMaps) -> Result<usize, SyncError> {
        let actual = MapContents::read(maps)?;
        let mut ranges: BTreeMap<u32, Vec<Cidr>> = BTreeMap::new();
        for (id, cidr) in maps.dump_source_ranges()? {
            ranges.entry(id).or_default().push(cidr);
        }
        for (key, value) in &actual.services {
            let ip = lb_common::addr::to_ip(&key.addr);
            if value.flags & lb_common::svc_flags::ADDRESS_ONLY != 0 {
                self.markers.insert(ip);
                continue;
            }
            let Some(protocol) = Protocol::from_ip_proto(key.proto) else {
                continue;
            };
            let scope = match key.scope {
                s if s == ServiceScope::Internal as u8 => ServiceScope::Internal,
                _ => ServiceScope::Cluster,
            };
            let mut backends = BTreeMap::new();
            for slot in 0..value.backend_count {
                let slot_key = BackendSlotKey {
                    service_id: value.service_id,
                    revision: value.revision,
                    slot,
                };
                if let Some(&id) = actual.slots.get(&slot_key)
                    && let Some(b) = actual.backends.get(&id)
                {
                    backends.insert(
                        Endpoint {
                            ip: lb_common::addr::to_ip(&b.addr),
                            port: b.port,
                        },
                        id,
                    );
                    self.backend_ids.reserve(id);
                }
            }
            self.service_ids.reserve(value.service_id);
            let mut source_ranges = ranges.remove(&value.service_id).unwrap_or_default();
            source_ranges.sort();
            self.programmed.insert(
                Frontend {
                    scope,
                    ..Frontend::new(ip, key.port, protocol)
                },
                Programmed {
                    service_id: value.service_id,
                    revision: value.revision,
                    slot_count: value.backend_count,
                    affinity_timeout: value.affinity_timeout,
                    flags: value.flags,
                    table_size: value.table_size,
                    source_ranges,
                    backends,
                },
            );
        }
        self.needs_full_resync = true;
        Ok(self.programmed.len())
    }

    /// Cluster IP markers: new ones written, gone ones deleted (all written
    /// again on a full resync).
    fn sync_markers(&mut self, maps: &mut impl DatapathMaps, model: &Model, full: bool) -> Result<(), SyncError> {
        for &ip in &model.cluster_ips {
            if full || !self.markers.contains(&ip) {
                maps.put_service(&marker_key(ip), &MARKER_VALUE)?;
                self.markers.insert(ip);
            }
        }
        let gone: Vec<IpAddr> = self.markers.difference(&model.cluster_ips).copied().collect();
        for ip in gone {
            maps.delete_service(&marker_key(ip))?;
            self.markers.remove(&ip);
        }
        Ok(())
    }

    /// Compares the maps with the model: service ports whose entries all
    /// match are left alone, the others are rewritten, and entries nobody
    /// owns (left by a failed sync, or written by someone else) are deleted.
    fn full_resync(
        &mut self,
        maps: &mut impl DatapathMaps,
        model: &Model,
        actual: Option<MapContents>,
    ) -> Result<SyncReport, SyncError> {
        let actual = match actual {
            Some(actual) => actual,
            None => MapContents::read(maps)?,
        };
        let stale: Vec<Frontend> = self
            .programmed
            .keys()
            .filter(|f| !model.services.contains_key(f))
            .copied()
            .collect();
        let upserted = model
            .services
            .values()
            .filter(|sp| self.programmed.get(&sp.frontend).is_none_or(|p| !p.is_in(&actual, sp)))
            .cloned()
            .collect::<Vec<_>>();
        info!(
            service_ports = model.services.len(),
            rewrite = upserted.len(),
            remove = stale.len(),
            "full resync"
        );
        let report = self.apply(
            maps,
            ChangeSet {
                removed: stale,
                upserted,
            },
            true,
        )?;
        self.sweep(maps, &actual)?;
        Ok(report)
    }

    /// Deletes the entries of `actual` that no programmed service port owns.
    fn sweep(&mut self, maps: &mut impl DatapathMaps, actual: &MapContents) -> Result<(), SyncError> {
        let keys: BTreeSet<ServiceKey> = self
            .programmed
            .keys()
            .map(service_key)
            .chain(self.markers.iter().map(|&ip| marker_key(ip)))
            .collect();
        for k in actual.services.keys().filter(|k| !keys.contains(k)) {
            maps.delete_service(k)?;
        }
        let live: BTreeMap<u32, (u32, u32)> = self
            .programmed
            .values()
            .map(|p| (p.service_id, (p.revision, p.slot_count)))
            .collect();
        for k in actual.slots.keys() {
            if live
                .get(&k.service_id)
                .is_none_or(|&(rev, n)| k.revision != rev || k.slot >= n)
            {
                maps.delete_slot(k)?;
            }
        }
        let backends: BTreeSet<BackendId> = self
            .programmed
            .values()
            .flat_map(|p| p.backends.values().copied())
            .collect();
        for &id in actual.backends.keys().filter(|id| !backends.contains(id)) {
            maps.delete_backend(id)?;
        }
        Ok(())
    }

    /// The next sync compares everything with the maps (the periodic resync).
    pub fn request_full_resync(&mut self) {
        self.needs_full_resync = true;
    }

    /// Ids in use: (frontend, service id, [(endpoint, backend id)]).
    pub fn ids(&self) -> impl Iterator<Item = (&Frontend, u32, Vec<(Endpoint, BackendId)>)> {
        self.programmed
            .iter()
            .map(|(f, p)| (f, p.service_id, p.backends.iter().map(|(e, id)| (*e, *id)).collect()))
    }

    /// UDP service ports whose flows to non-serving addresses are to be
    /// cleared, since the last call: service id → serving addresses.
    pub fn take_stale_udp_flows(&mut self) -> StaleUdpFlows {
        std::mem::take(&mut self.stale_udp)
    }

    /// kube-proxy's CleanStaleEntries, per sync: a UDP service port that
    /// has serving endpoints gets its flows to any other address cleared.
    /// A partial sync only looks at ports that lost a serving address (no
    /// other entry can point elsewhere); a full one (start-up, periodic)
    /// at every UDP port, which also catches what changed while no agent ran.
    fn note_stale_udp_flows(&mut self, model: &Model, full: bool) {
        for (f, sp) in &model.services {
            if sp.udp_serving.is_empty() {
                continue;
            }
            let lost = full
                || self
                    .applied
                    .services
                    .get(f)
                    .is_some_and(|old| !old.udp_serving.is_subset(&sp.udp_serving));
            if lost && let Some(p) = self.programmed.get(f) {
                self.stale_udp
                    .insert(p.service_id, sp.udp_serving.iter().map(|&ip| raw_addr(ip)).collect());
            }
        }
    }

    fn retire_backend(&mut self, maps: &mut impl DatapathMaps, id: BackendId) -> Result<(), SyncError> {
        maps.delete_backend(id)?;
        self.backend_ids.free(id);
        Ok(())
    }

    pub fn full_resync_pending(&self) -> bool {
        self.needs_full_resync
    }

    fn remove(&mut self, maps: &mut impl DatapathMaps, f: &Frontend) -> Result<(), SyncError> {
        let Some(p) = self.programmed.get(f).cloned() else {
            return Ok(());
        };
        maps.delete_service(&service_key(f))?;
        for slot in 0..p.slot_count {
            maps.delete_slot(&BackendSlotKey {
                service_id: p.service_id,
                revision: p.revision,
                slot,
            })?;
        }
        for &id in p.backends.values() {
            self.retire_backend(maps, id)?;
        }
        for range in &p.source_ranges {
            maps.delete_source_range(p.service_id, range)?;
        }
        if p.table_size != 0 {
            maps.delete_maglev(p.service_id)?;
        }
        self.service_ids.free(p.service_id);
        self.programmed.remove(f);
        debug!(frontend = %f, "service port removed");
        Ok(())
    }

    fn upsert(&mut self, maps: &mut impl DatapathMaps, sp: &ServicePort, rewrite_all: bool) -> Result<(), SyncError> {
        if sp.endpoints.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(SyncError::TooManyEndpoints {
                service: sp.name.clone(),
                count: sp.endpoints.len(),
                limit: MAX_BACKENDS_PER_SERVICE,
            });
        }
        let old = self.programmed.get(&sp.frontend).cloned();
        // Ids taken in this attempt go back if it fails.
        let mut fresh_ids = Vec::new();
        let result = self.write_service(maps, sp, old.as_ref(), rewrite_all, &mut fresh_ids);
        match result {
            Ok(new) => {
                self.programmed.insert(sp.frontend, new);
                Ok(())
            }
            Err(e) => {
                for (is_service, id) in fresh_ids {
                    if is_service {
                        self.service_ids.free(id)
                    } else {
                        self.backend_ids.free(id)
                    }
                }
                Err(e)
            }
        }
    }

    fn write_service(
        &mut self,
        maps: &mut impl DatapathMaps,
        sp: &ServicePort,
        old: Option<&Programmed>,
        rewrite_all: bool,
        fresh_ids: &mut Vec<(bool, u32)>,
    ) -> Result<Programmed, SyncError> {
        let service_id = match old {
            Some(p) => p.service_id,
            None => {
                let (id, reused) = self.service_ids.alloc()?;
                fresh_ids.push((true, id));
                if reused {
                    maps.reset_service_stats(id)?;
                }
                id
            }
        };
        let proto = sp.frontend.protocol.ip_proto();
        let mut backends = BTreeMap::new();
        for ep in &sp.endpoints {
            let (id, is_new) = match old.and_then(|p| p.backends.get(ep)) {
                Some(&id) => (id, false),
                None => {
                    let (id, reused) = self.backend_ids.alloc()?;
                    fresh_ids.push((false, id));
                    if reused {
                        maps.reset_backend_stats(id)?;
                    }
                    (id, true)
                }
            };
            // A full resync rewrites surviving backends too (they may be missing).
            if is_new || rewrite_all {
                let backend = Backend {
                    addr: raw_addr(ep.ip),
                    port: ep.port,
                    proto,
                    _pad: 0,
                    service_id,
                };
                maps.put_backend(id, &backend)?;
            }
            backends.insert(*ep, id);
        }
        let revision = old.map_or(1, |p| p.revision.wrapping_add(1).max(1));
        for (slot, &id) in backends.values().enumerate() {
            maps.put_slot(
                &BackendSlotKey {
                    service_id,
                    revision,
                    slot: slot as u32,
                },
                id,
            )?;
        }
        // Source ranges are in place before the entry that checks them.
        for range in &sp.source_ranges {
            maps.put_source_range(service_id, range)?;
        }
        // So is the Maglev table (swapped whole: a flow hash never meets half of one).
        let table_size = if backends.is_empty() { 0 } else { sp.table_size };
        if table_size != 0 {
            let ids: Vec<BackendId> = backends.values().copied().collect();
            let names: Vec<Vec<u8>> = backends.keys().map(|e| e.to_string().into_bytes()).collect();
            let table: Vec<BackendId> = crate::maglev::table(&names, table_size)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect();
            maps.put_maglev(service_id, &table)?;
        }
        let programmed = Programmed {
            service_id,
            revision,
            slot_count: backends.len() as u32,
            affinity_timeout: sp.affinity_timeout,
            flags: sp.flags,
            table_size,
            source_ranges: sp.source_ranges.clone(),
            backends,
        };
        maps.put_service(&service_key(&sp.frontend), &programmed.value())?;

        // The new list is live: retire the old one.
        if let Some(p) = old {
            for slot in 0..p.slot_count {
                maps.delete_slot(&BackendSlotKey {
                    service_id,
                    revision: p.revision,
                    slot,
                })?;
            }
            for (ep, &id) in &p.backends {
                if !programmed.backends.contains_key(ep) {
                    self.retire_backend(maps, id)?;
                }
            }
            for range in p.source_ranges.iter().filter(|r| !programmed.source_ranges.contains(r)) {
                maps.delete_source_range(service_id, range)?;
            }
            if p.table_size != 0 && table_size == 0 {
                maps.delete_maglev(service_id)?;
            }
        }
        debug!(service = %sp.name, frontend = %sp.frontend, backends = programmed.slot_count, revision, "service port programmed");
        Ok(programmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeMaps;
    use crate::model::Protocol;

    fn frontend(ip: &str, port: u16) -> Frontend {
        Frontend::new(ip.parse().unwrap(), port, Protocol::Tcp)
    }

    fn eps(ips: &[&str]) -> BTreeSet<Endpoint> {
        ips.iter()
            .map(|ip| Endpoint {
                ip: ip.parse().unwrap(),
                port: 80,
            })
            .collect()
    }

    fn model(services: &[(Frontend, &[&str])]) -> Model {
        Model::from_ports(
            services
                .iter()
                .map(|(f, ips)| ServicePort::new(f.to_string(), *f, eps(ips))),
        )
    }

    #[test]
    fn programs_updates_and_removes_without_exposing_partial_lists() {
        let (a, b) = (frontend("198.19.0.10", 8080), frontend("198.19.0.10", 9090));
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let r = syncer
            .sync(
                &mut maps,
                &model(&[(a, &["198.18.1.1", "198.18.1.2", "198.18.1.3"]), (b, &["198.18.1.4"])]),
            )
            .unwrap();
        assert!(r.full);
        assert_eq!(maps.resolve(&a), eps(&["198.18.1.1", "198.18.1.2", "198.18.1.3"]));
        assert_eq!(maps.resolve(&b), eps(&["198.18.1.4"]));
        let kept_id = syncer.programmed[&a].backends[&eps(&["198.18.1.1"]).into_iter().next().unwrap()];

        let r = syncer
            .sync(
                &mut maps,
                &model(&[(a, &["198.18.1.1", "198.18.1.3", "198.18.1.5"]), (b, &["198.18.1.4"])]),
            )
            .unwrap();
        assert_eq!(
            r,
            SyncReport {
                upserted: 1,
                removed: 0,
                full: false
            },
            "only the changed port is written"
        );
        assert_eq!(maps.resolve(&a), eps(&["198.18.1.1", "198.18.1.3", "198.18.1.5"]));
        assert_eq!(
            syncer.programmed[&a].backends[&eps(&["198.18.1.1"]).into_iter().next().unwrap()],
            kept_id,
            "surviving backend keeps its id"
        );
        assert_eq!(maps.backends.len(), 4, "the removed backend is deleted");
        assert_eq!(maps.slots.len(), 4, "old revision slots are deleted");

        syncer.sync(&mut maps, &model(&[(b, &["198.18.1.4"])])).unwrap();
        assert!(maps.resolve(&a).is_empty());
        assert_eq!((maps.services.len(), maps.slots.len(), maps.backends.len()), (1, 1, 1));
    }

    #[test]
    fn both_scopes_of_a_frontend_are_programmed_and_adopted_apart() {
        let external = frontend("198.18.0.11", 30080);
        let internal = Frontend {
            scope: ServiceScope::Internal,
            ..external
        };
        let m = model(&[(external, &["198.18.1.1"]), (internal, &["198.18.1.1", "198.18.2.1"])]);
        let mut maps = FakeMaps::default();
        Syncer::new().sync(&mut maps, &m).unwrap();
        assert_eq!(maps.resolve(&external), eps(&["198.18.1.1"]));
        assert_eq!(maps.resolve(&internal), eps(&["198.18.1.1", "198.18.2.1"]));
        assert_eq!(service_key(&internal).scope, ServiceScope::Internal as u8);

        // A restarted agent takes both over and rewrites nothing.
        let mut restarted = Syncer::new();
        assert_eq!(restarted.adopt(&maps).unwrap(), 2);
        let r = restarted.sync(&mut maps, &m).unwrap();
        assert_eq!((r.upserted, r.removed), (0, 0), "{r:?}");
    }

    #[test]
    fn failed_sync_keeps_other_services_and_full_resync_recovers() {
        let (a, b) = (frontend("198.19.0.10", 80), frontend("198.19.0.11", 80));
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        syncer.sync(&mut maps, &model(&[(a, &["198.18.1.1"])])).unwrap();
        maps.fail_backend_put_after = Some(1);
        let err = syncer
            .sync(
                &mut maps,
                &model(&[(a, &["198.18.1.1"]), (b, &["198.18.1.2", "198.18.1.3"])]),
            )
            .unwrap_err();
        assert!(err.to_string().contains("BACKENDS"), "{err}");
        assert_eq!(
            maps.resolve(&a),
            eps(&["198.18.1.1"]),
            "untouched service keeps working"
        );
        assert!(maps.resolve(&b).is_empty());

        maps.fail_backend_put_after = None;
        let r = syncer
            .sync(
                &mut maps,
                &model(&[(a, &["198.18.1.1"]), (b, &["198.18.1.2", "198.18.1.3"])]),
            )
            .unwrap();
        assert!(r.full, "a failed sync is followed by a full resync");
        assert_eq!(maps.resolve(&b), eps(&["198.18.1.2", "198.18.1.3"]));
        assert_eq!(maps.backends.len(), 3, "the half-written backend was swept or reused");
    }

    #[test]
    fn periodic_full_resync_repairs_only_what_differs() {
        let (a, b) = (frontend("198.19.0.10", 80), frontend("198.19.0.11", 80));
        let m = model(&[(a, &["198.18.1.1", "198.18.1.2"]), (b, &["198.18.1.3"])]);
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        syncer.sync(&mut maps, &m).unwrap();
        let r = syncer.sync(&mut maps, &m).unwrap();
        assert_eq!(
            r,
            SyncReport {
                upserted: 0,
                removed: 0,
                full: false
            }
        );

        // Someone changes a backend of b behind the agent's back.
        let id = syncer.programmed[&b].backends.values().next().copied().unwrap();
        maps.backends.get_mut(&id).unwrap().port = 9999;
        syncer.request_full_resync();
        let r = syncer.sync(&mut maps, &m).unwrap();
        assert_eq!(
            r,
            SyncReport {
                upserted: 1,
                removed: 0,
                full: true
            },
            "only b is rewritten"
        );
        assert_eq!(maps.resolve(&b), eps(&["198.18.1.3"]));
        assert_eq!(maps.resolve(&a), eps(&["198.18.1.1", "198.18.1.2"]));
    }

    #[test]
    fn full_resync_sweeps_entries_nobody_owns() {
        let a = frontend("198.19.0.10", 80);
        let mut maps = FakeMaps::default();
        let stray = service_key(&frontend("198.19.9.9", 1));
        maps.services.insert(
            stray,
            ServiceValue {
                service_id: 999,
                revision: 1,
                backend_count: 0,
                flags: 0,
                affinity_timeout: 0,
                table_size: 0,
            },
        );
        maps.slots.insert(
            BackendSlotKey {
                service_id: 999,
                revision: 1,
                slot: 0,
            },
            999,
        );
        let mut syncer = Syncer::new();
        syncer.sync(&mut maps, &model(&[(a, &["198.18.1.1"])])).unwrap();
        assert!(!maps.services.contains_key(&stray));
        assert_eq!(maps.slots.len(), 1);
    }

    #[test]
    fn id_allocator_reports_exhaustion_and_reuses_late() {
        let mut ids = IdAllocator::new(4, "test ids", "hint");
        assert_eq!((ids.alloc().unwrap(), ids.alloc().unwrap()), ((1, false), (2, false)));
        ids.free(1);
        assert_eq!(ids.alloc().unwrap(), (3, false), "next-fit: the freed id waits");
        assert_eq!(
            ids.alloc().unwrap(),
            (1, true),
            "a reused id is reported for counter reset"
        );
        assert!(matches!(ids.alloc(), Err(SyncError::IdsExhausted { limit: 3, .. })));
    }
    /// Which UDP service ports get their stale flows cleared after a sync
    /// (kube-proxy's CleanStaleEntries): every UDP port with serving
    /// endpoints on a full sync; on a partial one only ports that lost a
    /// serving address. TCP ports never.
    #[test]
    fn stale_udp_flows_are_reported_for_ports_that_lost_a_serving_address() {
        let udp = |ip: &str| Frontend {
            protocol: Protocol::Udp,
            ..frontend(ip, 53)
        };
        let (dns, other, web) = (udp("198.19.0.10"), udp("198.19.0.11"), frontend("198.19.0.12", 80));
        let ips = |l: &[&str]| -> BTreeSet<RawAddr> { l.iter().map(|ip| raw_addr(ip.parse().unwrap())).collect() };
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let m = model(&[
            (dns, &["198.18.1.1", "198.18.1.2"]),
            (other, &["198.18.1.3"]),
            (web, &["198.18.1.4"]),
        ]);
        syncer.sync(&mut maps, &m).unwrap();
        let id = |s: &Syncer, f: &Frontend| s.programmed[f].service_id;
        assert_eq!(
            syncer.take_stale_udp_flows(),
            BTreeMap::from([
                (id(&syncer, &dns), ips(&["198.18.1.1", "198.18.1.2"])),
                (id(&syncer, &other), ips(&["198.18.1.3"]))
            ]),
            "the first (full) sync checks every UDP port"
        );

        // .2 turns terminating (still serving): no longer a backend, but its flows stay.
        let mut terminating = m.clone();
        let sp = terminating.services.get_mut(&dns).unwrap();
        sp.endpoints = eps(&["198.18.1.1"]);
        syncer.sync(&mut maps, &terminating).unwrap();
        assert!(syncer.take_stale_udp_flows().is_empty());

        // .2 stops serving: its flows go; the other ports are not looked at.
        let mut gone = terminating.clone();
        gone.services.get_mut(&dns).unwrap().udp_serving = ips_of(&["198.18.1.1"]);
        syncer.sync(&mut maps, &gone).unwrap();
        assert_eq!(
            syncer.take_stale_udp_flows(),
            BTreeMap::from([(id(&syncer, &dns), ips(&["198.18.1.1"]))])
        );

        // The last serving endpoint goes: nothing to clear (kube-proxy too).
        let mut empty = gone.clone();
        let sp = empty.services.get_mut(&dns).unwrap();
        sp.endpoints.clear();
        sp.udp_serving.clear();
        syncer.sync(&mut maps, &empty).unwrap();
        assert!(syncer.take_stale_udp_flows().is_empty());
    }

    fn ips_of(l: &[&str]) -> BTreeSet<IpAddr> {
        l.iter().map(|ip| ip.parse().unwrap()).collect()
    }
}
