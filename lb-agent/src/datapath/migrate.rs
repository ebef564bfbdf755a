//! Upgrades keep established flows: each pinned map is checked on its own
//! (Cilium's map migration). A map whose kernel shape (type, key and value
//! size, capacity, flags) and layout version match this agent's is reused;
//! any other is moved aside to `<root>/migrate/` and the loader creates a
//! fresh one. Conntrack, affinity and socket translations are copied from
//! the old map into the new (converted from the previous layout version,
//! newest first when the new table is smaller), once before the new
//! programs are attached and once after, for what the old programs created
//! in between; the services and backends are read from the old maps so the
//! syncer keeps their ids (conntrack entries name them). The old maps are
//! unpinned only after the new programs are attached.
//!
//! While the programs are swapped interface by interface, the new ones
//! find the flows of the old conntrack table through `CONNTRACK_PREV`
//! (and write theirs into it too): a flow balanced on one interface by the
//! old programs and answered on another by the new ones (or the other way
//! round) stays translated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::maps::{HashMap, HashOfMaps, Map, MapData};
use lb_common::{
    AffinityKey, AffinityValue, CtEntry, CtKey, map_names,
    sock::{SockNatKey, SockRevNat},
};
use tracing::{info, warn};

/// Where maps that are not reused wait until the new programs are attached.
pub const MIGRATE_DIR: &str = "migrate";
/// Per-map layout version markers (`<NAME>-v<N>`, empty directories: a
/// bpffs holds only BPF objects and directories, and no dots in names).
pub const LAYOUT_DIR: &str = "layout";
/// The layout of every map pinned by an agent that recorded one signature
/// for all of them (a `layout-<hash>` directory): version 1.
const LEGACY_LAYOUT_VERSION: u32 = 1;
/// TEST ONLY: overrides CONNTRACK's layout version (the type stays the
/// same), so tests can exercise a layout migration without a second agent
/// build. Never set it in production.
pub const TEST_CT_LAYOUT_VERSION_ENV: &str = "LB_TEST_CONNTRACK_LAYOUT_VERSION";

const BPF_NOEXIST: u64 = 1;
/// A flag the kernel adds to some map types itself (device maps): not a
/// difference between the pinned map and the object's.
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// Maps whose entries are copied into their replacement.
const COPIED: [&str; 3] = [map_names::CONNTRACK, map_names::AFFINITY, map_names::SOCK_REVNAT];

/// What a map is as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// What start-up does with one pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing pinned: the loader creates it.
    Create,
    /// Pinned, same shape and layout: used as it is.
    Reuse,
    /// Moved aside and replaced; its entries are copied (converted from
    /// layout `from_version`).
    Migrate { from_version: u32, why: String },
    /// Moved aside and replaced; its entries are not carried over (the agent
    /// rebuilds the map, or its layout is too old to convert).
    Replace { why: String },
}

/// This agent's layout version of map `name` (with the test-only override).
pub fn layout_version(name: &str) -> u32 {
    if name == map_names::CONNTRACK
        && let Some(v) = std::env::var(TEST_CT_LAYOUT_VERSION_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
    {
        return v;
    }
    map_names::layout_version(name)
}

/// Decides what to do with map `name`, pinned as `pinned` (shape and
/// recorded layout version), for an agent that wants `want` at `version`.
pub fn plan(name: &str, pinned: Option<(MapShape, Option<u32>)>, want: &MapShape, version: u32) -> Plan {
    let Some((shape, recorded)) = pinned else {
        return Plan::Create;
    };
    let Some(recorded) = recorded else {
        return Plan::Replace {
            why: "no layout version recorded".into(),
        };
    };
    if shape == *want && recorded == version {
        return Plan::Reuse;
    }
    let mut why = Vec::new();
    if recorded != version {
        why.push(format!("layout v{recorded} -> v{version}"));
    }
    if shape.max_entries != want.max_entries {
        why.push(format!("capacity {} -> {}", shape.max_entries, want.max_entries));
    }
    if (shape.map_type, shape.key_size, shape.value_size, shape.flags)
        != (want.map_type, want.key_size, want.value_size, want.flags)
    {
        why.push(format!(
            "type/key/value/flags {}/{}/{}/{:#x} -> {}/{}/{}/{:#x}",
            shape.map_type,
            shape.key_size,
            shape.value_size,
            shape.flags,
            want.map_type,
            want.key_size,
            want.value_size,
            want.flags
        ));
    }
    let why = why.join(", ");
    let convertible = recorded == version || recorded + 1 == version;
    match (COPIED.contains(&name), convertible) {
        (true, true) => Plan::Migrate {
            from_version: recorded,
            why,
        },
        (true, false) => Plan::Replace {
            why: format!("{why}; no conversion from that layout, entries dropped"),
        },
        (false, _) => Plan::Replace { why },
    }
}

fn shape_of(data: &MapData) -> anyhow::Result<MapShape> {
    let info = data.info()?;
    Ok(MapShape {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags() & !BPF_F_RDONLY_PROG,
    })
}

/// The shapes the object's maps get with the loader's capacity overrides.
pub fn wanted_shapes(object: &[u8], capacities: &[(&str, u32)]) -> anyhow::Result<BTreeMap<String, MapShape>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let max_entries = capacities
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, c)| *c);
            let shape = MapShape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags() & !BPF_F_RDONLY_PROG,
            };
            (name.clone(), shape)
        })
        .collect())
}

fn marker_prefix(name: &str) -> String {
    format!("{name}-v")
}

/// The layout version recorded for map `name` under `root`.
fn recorded_version(root: &Path, name: &str) -> Option<u32> {
    let prefix = marker_prefix(name);
    let recorded = std::fs::read_dir(root.join(LAYOUT_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok());
    recorded.or_else(|| has_legacy_marker(root).then_some(LEGACY_LAYOUT_VERSION))
}

fn has_legacy_marker(root: &Path) -> bool {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("layout-"))
}

/// Removes the one-signature markers of earlier agents.
pub fn remove_legacy_markers(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("layout-") {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Records this agent's layout version of every map.
pub fn record_versions(root: &Path) -> anyhow::Result<()> {
    let dir = root.join(LAYOUT_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in map_names::ALL {
        let want = format!("{}{}", marker_prefix(name), layout_version(name));
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&marker_prefix(name)) && file != want {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        let marker = dir.join(&want);
        if !marker.is_dir() {
            std::fs::create_dir(&marker).with_context(|| format!("creating {}", marker.display()))?;
        }
    }
    remove_legacy_markers(root);
    Ok(())
}

/// The maps moved aside at start-up, until the new programs are attached.
#[derive(Default)]
pub struct Migration {
    dir: Option<PathBuf>,
    /// Map name → what is done with it.
    moved: BTreeMap<&'static str, Plan>,
    /// Map name → the first copy pass's cutoff (see `Pass`).
    cutoffs: BTreeMap<&'static str, Option<u32>>,
}

/// What one copy pass did with one map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Entries written into the new map.
    pub copied: usize,
    /// Live entries that did not fit (the new table is smaller): the
    /// oldest-expiring ones.
    pub dropped: usize,
    /// Entries that had expired, or that the new map already held.
    pub skipped: usize,
    /// After attaching: entries the old programs changed since the first
    /// copy, written again (the new programs had not used them yet).
    pub updated: usize,
}

/// Which copy pass, and what the first one left for the second.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    after_attach: bool,
    /// The lowest rank the first pass kept when the new map was too small:
    /// the second leaves out older entries too (inserting them into a full
    /// LRU would evict newer ones).
    cutoff: Option<u32>,
}

impl Migration {
    /// Plans every pinned map under `root` and moves aside those that are
    /// not reused. `wanted`: the shapes this agent's object creates.
    pub fn prepare(root: &Path, wanted: &BTreeMap<String, MapShape>) -> anyhow::Result<Self> {
        let dir = root.join(MIGRATE_DIR);
        if dir.exists() {
            // An agent stopped in the middle of a migration. A map it moved
            // aside whose replacement it had not created yet is the one the
            // attached programs use: it goes back. Where a replacement
            // exists, that agent got as far as loading (and its layout
            // versions are recorded): the replacement stays.
            for name in map_names::ALL {
                let (aside, pin) = (dir.join(name), root.join(name));
                if aside.exists() && !pin.exists() {
                    std::fs::rename(&aside, &pin).with_context(|| format!("moving {} back", aside.display()))?;
                    warn!(map = name, "map: moved back from an interrupted migration");
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        let mut migration = Migration {
            dir: Some(dir.clone()),
            ..Migration::default()
        };
        for name in map_names::ALL {
            let path = root.join(name);
            let pinned = match MapData::from_pin(&path) {
                Ok(data) => Some((shape_of(&data)?, recorded_version(root, name))),
                Err(_) => None,
            };
            let want = wanted
                .get(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            let plan = plan(name, pinned, want, layout_version(name));
            match &plan {
                Plan::Create => info!(map = name, "map: created"),
                Plan::Reuse => info!(map = name, "map: reused"),
                Plan::Migrate { why, .. } | Plan::Replace { why } => {
                    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                    std::fs::rename(&path, dir.join(name))
                        .with_context(|| format!("moving {} aside", path.display()))?;
                    if matches!(plan, Plan::Migrate { .. }) {
                        info!(map = name, reason = %why, "map: migrating its entries into a new one (the old one is kept until the new programs are attached)");
                    } else {
                        info!(map = name, reason = %why, "map: replaced by a new one the agent fills (the old one is kept until the new programs are attached)");
                    }
                    migration.moved.insert(name, plan.clone());
                }
            }
        }
        Ok(migration)
    }

    /// No pins under a root (tests): nothing to migrate.
    pub fn none() -> Self {
        Migration::default()
    }

    /// Was map `name` moved aside?
    pub fn moved(&self, name: &str) -> bool {
        self.moved.contains_key(name)
    }

    /// The old map `name` (moved aside), opened.
    fn old(&self, name: &str) -> Option<anyhow::Result<MapData>> {
        let dir = self.dir.as_ref()?;
        self.moved
            .contains_key(name)
            .then(|| MapData::from_pin(dir.join(name)).with_context(|| format!("opening the previous {name} map")))
    }

    /// The pin of map `name` the previous agent's programs use: moved aside,
    /// or the reused one under `root`.
    pub fn previous_pin(&self, root: &Path, name: &str) -> PathBuf {
        match &self.dir {
            Some(dir) if self.moved(name) => dir.join(name),
            _ => root.join(name),
        }
    }

    /// Lets the new programs see the old conntrack table (see the module
    /// comment) while the programs are swapped.
    pub fn share_conntrack(&self, prev: &mut HashOfMaps<MapData, u32, MapData>) {
        let Some(old) = self.old(map_names::CONNTRACK) else {
            return;
        };
        if let Err(e) = old.and_then(|m| Ok(prev.insert(0, &m, 0)?)) {
            // A layout of another size: copied only.
            warn!("the previous conntrack table cannot be shared during the switch-over: {e:#}");
        }
    }

    /// Copies the entries of the maps being migrated into `maps`: those the
    /// new map lacks; after attaching (`after_attach`) also those the old
    /// programs changed since that the new ones have not used yet.
    pub fn copy_entries(
        &mut self,
        maps: &mut super::BpfMaps,
        after_attach: bool,
    ) -> BTreeMap<&'static str, CopyReport> {
        let now = crate::run::monotonic_secs();
        let mut reports = BTreeMap::new();
        for (&name, plan) in &self.moved {
            let Plan::Migrate { from_version, .. } = plan else {
                continue;
            };
            let Some(old) = self.old(name) else { continue };
            let mut pass = Pass {
                after_attach,
                cutoff: self.cutoffs.get(name).copied().flatten(),
            };
            let result = old.and_then(|old| match name {
                map_names::CONNTRACK => copy_conntrack(old, &mut maps.conntrack, *from_version, now, &mut pass),
                map_names::AFFINITY => copy_affinity(old, &mut maps.affinity, *from_version, &mut pass),
                map_names::SOCK_REVNAT => copy_sock_revnat(old, &mut maps.sock_revnat, *from_version, &mut pass),
                _ => Ok(CopyReport::default()),
            });
            match result {
                Ok(r) => {
                    info!(
                        map = name,
                        from_version,
                        copied = r.copied,
                        updated = r.updated,
                        dropped = r.dropped,
                        skipped = r.skipped,
                        pass = if after_attach { "after attach" } else { "before attach" },
                        "map: migrated entries"
                    );
                    reports.insert(name, r);
                    if !after_attach {
                        self.cutoffs.insert(name, pass.cutoff);
                    }
                }
                Err(e) => warn!(map = name, "map: entries not migrated: {e:#}"),
            }
        }
        reports
    }

    /// After the new programs are attached: the last copy pass, then the
    /// old maps go.
    pub fn finish(&mut self, maps: &mut super::BpfMaps, prev: &mut HashOfMaps<MapData, u32, MapData>) {
        if self.moved.is_empty() {
            return;
        }
        self.copy_entries(maps, true);
        let _ = prev.remove(&0);
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        info!(maps = ?self.moved.keys().collect::<Vec<_>>(), "migration done: previous maps removed");
        self.moved.clear();
    }
}

/// Opens `old` as a hash map of `K` → `V` (refused when the sizes differ).
fn typed<K: aya::Pod, V: aya::Pod>(old: MapData) -> anyhow::Result<HashMap<MapData, K, V>> {
    Ok(HashMap::try_from(Map::from_map_data(old)?)?)
}

/// Copies `entries` (already converted) into `new`, where absent: the
/// `capacity` with the highest `rank` (newest), inserted oldest first so
/// an LRU that evicts early evicts those. After attaching, an entry the new
/// map holds `untouched` by the new programs is written again if it changed.
fn insert_newest<K: aya::Pod, V: aya::Pod + PartialEq>(
    new: &mut HashMap<MapData, K, V>,
    mut entries: Vec<(K, V)>,
    rank: impl Fn(&V) -> u32,
    untouched: impl Fn(&V) -> bool,
    pass: &mut Pass,
    mut report: CopyReport,
) -> anyhow::Result<CopyReport> {
    use aya::maps::IterableMap as _;
    const BPF_EXIST: u64 = 2;
    let capacity = new.map().info().map(|i| i.max_entries() as usize).unwrap_or(usize::MAX);
    entries.sort_by_key(|(_, v)| rank(v));
    let left_out = if pass.after_attach {
        // Ties at the cutoff may have been left out: they stay out.
        pass.cutoff
            .map_or(0, |cutoff| entries.partition_point(|(_, v)| rank(v) <= cutoff))
    } else {
        let excess = entries.len().saturating_sub(capacity);
        if excess > 0 {
            pass.cutoff = entries.get(excess).map(|(_, v)| rank(v));
        }
        excess
    };
    report.dropped += left_out;
    let exists = |e: &aya::maps::MapError, errno| matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno));
    for (k, v) in entries.into_iter().skip(left_out) {
        match new.insert(k, v, BPF_NOEXIST) {
            Ok(()) => report.copied += 1,
            Err(e) if exists(&e, libc::EEXIST) => {
                let stale = pass.after_attach && new.get(&k, 0).is_ok_and(|cur| untouched(&cur) && cur != v);
                // Gone in between (the LRU, the GC): nothing to update.
                match stale.then(|| new.insert(k, v, BPF_EXIST)) {
                    Some(Ok(())) => report.updated += 1,
                    Some(Err(e)) if !exists(&e, libc::ENOENT) => return Err(e.into()),
                    _ => report.skipped += 1,
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(report)
}

/// Reads every entry of `old` and converts it with `convert` (None: not
/// carried over, counted as skipped).
fn read_converted<PK: aya::Pod, PV: aya::Pod, K, V>(
    old: MapData,
    name: &'static str,
    convert: impl Fn(PK, PV) -> Option<(K, V)>,
    report: &mut CopyReport,
) -> anyhow::Result<Vec<(K, V)>> {
    let old: HashMap<MapData, PK, PV> = typed(old)?;
    let mut out = Vec::new();
    for (k, v) in super::maps::dump(&old, name)? {
        match convert(k, v) {
            Some(kv) => out.push(kv),
            None => report.skipped += 1,
        }
    }
    Ok(out)
}

/// Conversions from the previous layout version of each copied map (kept
/// for one version). Version 1 is the first layout: its "previous" is the
/// same types (what the test-only layout bump exercises). A change of a
/// type bumps its version (lb-common) and moves the old definition here
/// with its conversion.
mod previous {
    pub type CtKey = lb_common::CtKey;
    pub type CtEntry = lb_common::CtEntry;
    pub fn conntrack(k: CtKey, e: CtEntry) -> Option<(lb_common::CtKey, lb_common::CtEntry)> {
        Some((k, e))
    }
    pub type AffinityKey = lb_common::AffinityKey;
    pub type AffinityValue = lb_common::AffinityValue;
    pub fn affinity(k: AffinityKey, v: AffinityValue) -> Option<(lb_common::AffinityKey, lb_common::AffinityValue)> {
        Some((k, v))
    }
    pub type SockNatKey = lb_common::sock::SockNatKey;
    pub type SockRevNat = lb_common::sock::SockRevNat;
    pub fn sock_revnat(
        k: SockNatKey,
        v: SockRevNat,
    ) -> Option<(lb_common::sock::SockNatKey, lb_common::sock::SockRevNat)> {
        Some((k, v))
    }
}

/// Whether `from_version` is this agent's own layout (else the previous).
fn same_layout(name: &str, from_version: u32) -> bool {
    from_version == layout_version(name)
}

/// CONNTRACK: live entries, the latest-expiring first.
fn copy_conntrack(
    old: MapData,
    new: &mut HashMap<MapData, CtKey, CtEntry>,
    from_version: u32,
    now: u32,
    pass: &mut Pass,
) -> anyhow::Result<CopyReport> {
    use lb_common::conntrack::entry_flags::MIGRATED;
    let name = map_names::CONNTRACK;
    let mut report = CopyReport::default();
    let mut entries = if same_layout(name, from_version) {
        read_converted(old, name, |k: CtKey, e: CtEntry| Some((k, e)), &mut report)?
    } else {
        read_converted(old, name, previous::conntrack, &mut report)?
    };
    let before = entries.len();
    entries.retain(|(_, e)| e.expires_at >= now);
    report.skipped += before - entries.len();
    for (_, e) in &mut entries {
        e.flags |= MIGRATED;
    }
    insert_newest(
        new,
        entries,
        |e| e.expires_at,
        |e| e.flags & MIGRATED != 0,
        pass,
        report,
    )
}

/// AFFINITY: the most recently used first.
fn copy_affinity(
    old: MapData,
    new: &mut HashMap<MapData, AffinityKey, AffinityValue>,
    from_version: u32,
    pass: &mut Pass,
) -> anyhow::Result<CopyReport> {
    let name = map_names::AFFINITY;
    let mut report = CopyReport::default();
    let entries = if same_layout(name, from_version) {
        read_converted(old, name, |k: AffinityKey, v: AffinityValue| Some((k, v)), &mut report)?
    } else {
        read_converted(old, name, previous::affinity, &mut report)?
    };
    // The new programs' choice stands: nothing tells their entries apart.
    insert_newest(new, entries, |v| v.last_used, |_| false, pass, report)
}

/// SOCK_REVNAT: no age to rank by.
fn copy_sock_revnat(
    old: MapData,
    new: &mut HashMap<MapData, SockNatKey, SockRevNat>,
    from_version: u32,
    pass: &mut Pass,
) -> anyhow::Result<CopyReport> {
    let name = map_names::SOCK_REVNAT;
    let mut report = CopyReport::default();
    let entries = if same_layout(name, from_version) {
        read_converted(old, name, |k: SockNatKey, v: SockRevNat| Some((k, v)), &mut report)?
    } else {
        read_converted(old, name, previous::sock_revnat, &mut report)?
    };
    insert_newest(new, entries, |_| 0, |_| false, pass, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LRU: u32 = 9;

    fn shape(max_entries: u32) -> MapShape {
        MapShape {
            map_type: LRU,
            key_size: 40,
            value_size: 52,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn maps_are_reused_migrated_or_replaced_each_on_its_own() {
        let ct = map_names::CONNTRACK;
        let want = shape(1000);
        assert_eq!(plan(ct, None, &want, 1), Plan::Create);
        assert_eq!(plan(ct, Some((shape(1000), Some(1))), &want, 1), Plan::Reuse);
        assert_eq!(
            plan(ct, Some((shape(500), Some(1))), &want, 1),
            Plan::Migrate {
                from_version: 1,
                why: "capacity 500 -> 1000".into()
            }
        );
        assert_eq!(
            plan(ct, Some((shape(1000), Some(1))), &want, 2),
            Plan::Migrate {
                from_version: 1,
                why: "layout v1 -> v2".into()
            },
            "the previous layout is converted"
        );
        assert!(
            matches!(plan(ct, Some((shape(1000), Some(1))), &want, 3), Plan::Replace { .. }),
            "two versions back is too old"
        );
        assert!(
            matches!(plan(ct, Some((shape(1000), Some(2))), &want, 1), Plan::Replace { .. }),
            "a downgrade starts afresh"
        );
        assert!(
            matches!(plan(ct, Some((shape(1000), None)), &want, 1), Plan::Replace { .. }),
            "unknown layout"
        );
        // Maps the agent rebuilds are replaced, never copied.
        assert!(matches!(
            plan(map_names::SERVICES, Some((shape(500), Some(1))), &want, 1),
            Plan::Replace { .. }
        ));
        assert_eq!(
            plan(map_names::SERVICES, Some((shape(1000), Some(1))), &want, 1),
            Plan::Reuse
        );
    }
}
