//! Where objects come from. A source task keeps a `SourceState` current —
//! the manifests source by replacing everything after each read, the
//! Kubernetes source object by object from its watches — and signals a
//! change; sync takes a `Snapshot` from it when it runs (kube-proxy's
//! change trackers + BoundedFrequencyRunner, in that order).

pub mod kube;
pub mod manifests;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::model::{FieldError, NodeSpec, ServiceSpec, SliceSpec, Snapshot};

/// namespace/name of an object.
pub type ObjectKey = (String, String);

#[derive(Default)]
struct Stores {
    synced: bool,
    /// Bumped on every change: logs tie a sync to the source state it applied.
    generation: u64,
    services: BTreeMap<ObjectKey, ServiceSpec>,
    slices: BTreeMap<ObjectKey, SliceSpec>,
    nodes: BTreeMap<String, NodeSpec>,
    changes: ChangeLog,
}

/// Changes seen (kube-proxy's `…_changes_total`) and those not programmed
/// yet (`…_changes_pending`), each with the generation that brought it.
struct ChangeLog {
    services_total: u64,
    endpoints_total: u64,
    pending_services: BTreeMap<ObjectKey, u64>,
    pending_slices: BTreeMap<ObjectKey, u64>,
    /// The trigger times of slice changes not programmed yet, as
    /// (generation, IPv6, time); like kube-proxy, only those later than
    /// the start (older ones say nothing about this agent's latency).
    pending_triggers: Vec<(u64, bool, SystemTime)>,
    started: SystemTime,
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog {
            services_total: 0,
            endpoints_total: 0,
            pending_services: BTreeMap::new(),
            pending_slices: BTreeMap::new(),
            pending_triggers: Vec::new(),
            started: SystemTime::now(),
        }
    }
}

/// The objects a source has seen, shared with the sync loop.
#[derive(Default)]
pub struct SourceState {
    stores: Mutex<Stores>,
    changed: Notify,
}

/// One object added/changed or removed.
#[derive(Debug, Clone)]
pub enum Change {
    Service(ObjectKey, Option<ServiceSpec>),
    Slice(ObjectKey, Option<SliceSpec>),
    Node(String, Option<NodeSpec>),
}

fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    };
}

impl SourceState {
    fn stores(&self) -> std::sync::MutexGuard<'_, Stores> {
        self.stores.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the stores under one lock (sync never sees half of a
    /// change) and signals it; returns the new generation.
    fn modify(&self, f: impl FnOnce(&mut Stores)) -> u64 {
        let generation = {
            let mut s = self.stores();
            f(&mut s);
            s.generation += 1;
            s.generation
        };
        self.changed.notify_one();
        generation
    }

    /// Replaces every object (a complete read) and marks the state synced;
    /// the objects that differ count as changes.
    pub fn replace_all(&self, snapshot: Snapshot) -> u64 {
        self.modify(|s| {
            let services = snapshot
                .services
                .into_iter()
                .map(|x| ((x.namespace.clone(), x.name.clone()), x))
                .collect();
            let slices = snapshot
                .slices
                .into_iter()
                .map(|x| ((x.namespace.clone(), x.name.clone()), x))
                .collect();
            let mut changes = differences(&s.services, services, Change::Service);
            changes.extend(differences(&s.slices, slices, Change::Slice));
            apply_changes(s, changes);
            s.nodes = snapshot.nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
            s.synced = true;
        })
    }

    /// Applies changes; they count once the state is synced.
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) -> u64 {
        self.modify(|s| apply_changes(s, changes))
    }

    /// Replaces all objects of one kind (a relist) in one step, so a
    /// relist never shows a half-empty state to sync.
    pub fn replace_kind(&self, kind: Kind, changes: Vec<Change>) -> u64 {
        self.modify(|s| {
            match kind {
                Kind::Service => s.services.clear(),
                Kind::Slice => s.slices.clear(),
                Kind::Node => s.nodes.clear(),
            }
            apply_changes(s, changes)
        })
    }

    pub fn mark_synced(&self) -> u64 {
        self.modify(|s| s.synced = true)
    }

    /// The current objects and their generation, or None before the first
    /// complete list.
    pub fn snapshot(&self) -> Option<(Snapshot, u64)> {
        let s = self.stores();
        s.synced.then(|| {
            let snapshot = Snapshot {
                services: s.services.values().cloned().collect(),
                slices: s.slices.values().cloned().collect(),
                nodes: s.nodes.values().cloned().collect(),
            };
            (snapshot, s.generation)
        })
    }

    /// The changes up to `generation` are programmed: no longer pending.
    /// Returns their trigger times, as (IPv6, time).
    pub fn programmed(&self, generation: u64) -> Vec<(bool, SystemTime)> {
        let mut s = self.stores();
        s.changes.pending_services.retain(|_, g| *g > generation);
        s.changes.pending_slices.retain(|_, g| *g > generation);
        let (done, pending) = std::mem::take(&mut s.changes.pending_triggers)
            .into_iter()
            .partition(|(g, _, _)| *g <= generation);
        s.changes.pending_triggers = pending;
        done.into_iter().map(|(_, v6, t)| (v6, t)).collect()
    }

    /// The changes seen and those pending.
    pub fn change_counts(&self) -> crate::metrics::ChangeCounts {
        let s = self.stores();
        crate::metrics::ChangeCounts {
            services_total: s.changes.services_total,
            endpoints_total: s.changes.endpoints_total,
            services_pending: s.changes.pending_services.len(),
            endpoints_pending: s.changes.pending_slices.len(),
        }
    }

    /// Completes after a change (changes made before the call count too).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

/// The changes that turn `old` into `new`: removals, then additions and
/// modifications.
fn differences<V: PartialEq>(
    old: &BTreeMap<ObjectKey, V>,
    new: BTreeMap<ObjectKey, V>,
    change: fn(ObjectKey, Option<V>) -> Change,
) -> Vec<Change> {
    let mut changes: Vec<Change> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| change(k.clone(), None))
        .collect();
    changes.extend(
        new.into_iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .map(|(k, v)| change(k, Some(v))),
    );
    changes
}

fn apply_changes(s: &mut Stores, changes: impl IntoIterator<Item = Change>) {
    // The generation `modify` gives these changes.
    let generation = s.generation + 1;
    for change in changes {
        match change {
            Change::Service(k, v) => {
                s.changes.services_total += 1;
                s.changes.pending_services.insert(k.clone(), generation);
                set(&mut s.services, k, v)
            }
            Change::Slice(k, v) => {
                s.changes.endpoints_total += 1;
                s.changes.pending_slices.insert(k.clone(), generation);
                if let Some(slice) = &v
                    && let Some(t) = slice.trigger_time.filter(|t| *t > s.changes.started)
                {
                    s.changes.pending_triggers.push((generation, slice.ipv6, t));
                }
                set(&mut s.slices, k, v)
            }
            Change::Node(k, v) => set(&mut s.nodes, k, v),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Service,
    Slice,
    Node,
}

/// Logs the values a conversion skipped as kube-proxy skips them (the rest
/// of the object is used).
/// `namespace` is "" for cluster-scoped objects.
pub fn warn_ignored(kind: &str, namespace: &str, name: &str, ignored: &[FieldError]) {
    let slash = if namespace.is_empty() { "" } else { "/" };
    for e in ignored {
        tracing::warn!("{kind} {namespace}{slash}{name}: {e}; value ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ("ns".into(), name.into())
    }

    #[test]
    fn changes_are_counted_and_pending_until_their_generation_is_programmed() {
        let state = SourceState::default();
        let first = state.apply([
            Change::Service(key("a"), None),
            Change::Slice(key("a-1"), None),
            Change::Slice(key("a-1"), None),
        ]);
        let counts = state.change_counts();
        assert_eq!(
            counts,
            crate::metrics::ChangeCounts {
                services_total: 1,
                endpoints_total: 2,
                services_pending: 1,
                // One slice changed twice: one pending change.
                endpoints_pending: 1,
            }
        );
        let second = state.apply([Change::Slice(key("b-1"), None)]);
        state.programmed(first);
        let counts = state.change_counts();
        assert_eq!((counts.services_pending, counts.endpoints_pending), (0, 1));
        assert_eq!(counts.endpoints_total, 3);
        state.programmed(second);
        let counts = state.change_counts();
        assert_eq!((counts.services_pending, counts.endpoints_pending), (0, 0));
        assert_eq!((counts.services_total, counts.endpoints_total), (1, 3));
    }

    fn slice_triggered_at(name: &str, trigger_time: SystemTime) -> Change {
        let spec = SliceSpec {
            namespace: "ns".into(),
            name: name.into(),
            service_name: "a".into(),
            ports: vec![],
            endpoints: vec![],
            ignored: vec![],
            ipv6: true,
            trigger_time: Some(trigger_time),
        };
        Change::Slice(key(name), Some(spec))
    }

    #[test]
    fn a_complete_read_counts_the_objects_that_differ() {
        let state = SourceState::default();
        let now = SystemTime::now();
        let slices = |names: &[(&str, SystemTime)]| Snapshot {
            slices: names
                .iter()
                .map(|(n, t)| match slice_triggered_at(n, *t) {
                    Change::Slice(_, Some(spec)) => spec,
                    _ => unreachable!(),
                })
                .collect(),
            ..Snapshot::default()
        };
        let first = state.replace_all(slices(&[("a-1", now), ("a-2", now)]));
        assert_eq!(state.change_counts().endpoints_total, 2);
        state.programmed(first);
        // a-1 unchanged, a-2 changed, a-3 added.
        let later = now + std::time::Duration::from_secs(1);
        state.replace_all(slices(&[("a-1", now), ("a-2", later), ("a-3", now)]));
        let counts = state.change_counts();
        assert_eq!((counts.endpoints_total, counts.endpoints_pending), (4, 2));
        // a-1 and a-2 removed.
        state.replace_all(slices(&[("a-3", now)]));
        assert_eq!(state.change_counts().endpoints_total, 6);
        assert_eq!(state.snapshot().unwrap().0, slices(&[("a-3", now)]));
    }

    #[test]
    fn trigger_times_after_the_start_are_handed_back_once_programmed() {
        let state = SourceState::default();
        let hour = std::time::Duration::from_secs(3600);
        let recent = SystemTime::now();
        let first = state.apply([
            slice_triggered_at("a-1", recent),
            // Before the agent started: not this agent's latency.
            slice_triggered_at("a-2", recent - hour),
        ]);
        let second = state.apply([slice_triggered_at("a-3", recent)]);
        assert_eq!(state.programmed(first), [(true, recent)]);
        assert_eq!(state.programmed(first), []);
        assert_eq!(state.programmed(second), [(true, recent)]);
    }
}
