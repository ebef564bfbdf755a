//! Loading the embedded eBPF object and pinning its maps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashOfMaps, MapData},
    programs::{SchedClassifier, Xdp},
};
use lb_common::map_names;

use super::maps::BpfMaps;
use super::migrate::{self, CopyReport, Migration};

/// The eBPF object built by build.rs from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the TC ingress program in the object.
pub const INGRESS_PROGRAM: &str = "lb_ingress";
pub const EGRESS_PROGRAM: &str = "lb_egress";
pub const XDP_PROGRAM: &str = "lb_xdp";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Directory on a bpffs where maps are pinned (None: no pins, for tests).
    pub bpf_root: Option<PathBuf>,
    /// CONNTRACK capacity.
    pub conntrack_max: u32,
    /// Service ports (frontends and cluster IP markers): SERVICES and
    /// SERVICE_STATS capacity, `--max-services`.
    pub max_services: u32,
    /// Backends: BACKENDS and BACKEND_STATS capacity (BACKEND_SLOTS twice
    /// that), `--max-backends`.
    pub max_backends: u32,
}

impl LoadOptions {
    /// Default capacities (the `lb_common::limits` sizes).
    pub fn new(bpf_root: Option<PathBuf>, conntrack_max: u32) -> Self {
        LoadOptions {
            bpf_root,
            conntrack_max,
            max_services: lb_common::limits::MAX_SERVICES,
            max_backends: lb_common::limits::MAX_BACKENDS,
        }
    }
}

/// A loaded datapath: the program (not yet attached) and its maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: BpfMaps,
    pinned: Option<PathBuf>,
    /// The maps moved aside at start-up, until `finish_migration`.
    migration: Migration,
    /// The previous agent's services and backends as its programs see them
    /// (some maps moved aside), when they were not all reused.
    previous: Option<BpfMaps>,
    /// An earlier agent left maps (its services keep their ids).
    had_pins: bool,
    /// CONNTRACK_PREV (see migrate.rs).
    conntrack_prev: HashOfMaps<MapData, u32, MapData>,
    /// What the copy before attaching did, per migrated map.
    migrated: BTreeMap<&'static str, CopyReport>,
    /// Pinned socket-hook links (see `attach_socket_hooks`).
    pub(super) sock_links: Vec<aya::programs::links::PinnedLink>,
}

fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// The capacities the loader gives maps sized by flags.
fn capacities(opts: &LoadOptions) -> [(&'static str, u32); 6] {
    [
        (map_names::CONNTRACK, opts.conntrack_max),
        (map_names::SERVICES, opts.max_services),
        (map_names::SERVICE_STATS, opts.max_services),
        (map_names::BACKENDS, opts.max_backends),
        (map_names::BACKEND_STATS, opts.max_backends),
        (map_names::BACKEND_SLOTS, opts.max_backends.saturating_mul(2)),
    ]
}

/// Prepares `root` for reuse: each map pinned there by an earlier agent is
/// kept when its shape and layout match this agent's, else moved aside to
/// be migrated or rebuilt (see `migrate`).
fn prepare_pins(root: &Path, opts: &LoadOptions) -> anyhow::Result<Migration> {
    std::fs::create_dir_all(root).with_context(|| format!("creating bpf root {}", root.display()))?;
    if !is_bpffs(root) {
        bail!(
            "{} is not on a bpf file system; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass --bpf-root under it",
            root.display()
        );
    }
    let wanted = migrate::wanted_shapes(EBPF_OBJECT, &capacities(opts))?;
    Migration::prepare(root, &wanted)
}

/// Verifies the TC (ingress, egress) and XDP programs (loaded, not attached).
fn load_packet_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(INGRESS_PROGRAM)
        .context("program lb_ingress missing from the object")?
        .try_into()?;
    program.load().context("verifying lb_ingress")?;
    let egress: &mut SchedClassifier = ebpf
        .program_mut(EGRESS_PROGRAM)
        .context("program lb_egress missing from the object")?
        .try_into()?;
    egress.load().context("verifying lb_egress")?;
    let xdp: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .context("program lb_xdp missing from the object")?
        .try_into()?;
    xdp.load().context("verifying lb_xdp")?;
    Ok(())
}

impl Datapath {
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        let mut loader = EbpfLoader::new();
        for (name, capacity) in capacities(opts) {
            loader.map_max_entries(name, capacity);
        }
        let (mut migration, had_pins) = match &opts.bpf_root {
            Some(root) => {
                let had_pins = root.join(map_names::SERVICES).exists();
                (prepare_pins(root, opts)?, had_pins)
            }
            None => (Migration::none(), false),
        };
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.bpf_root {
            Some(root) => map_names::ALL.iter().map(|n| (*n, root.join(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            // Reuses the pinned map when there is one, else creates and pins it.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (needs root, BTF and a 6.x kernel)")?;
        if let Some(root) = &opts.bpf_root {
            migrate::record_versions(root)?;
        }
        load_packet_programs(&mut ebpf)?;
        for name in super::sock::SOCK_PROGRAMS {
            let prog: &mut aya::programs::CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        let mut maps = BpfMaps::take(&mut ebpf)?;
        let mut conntrack_prev: HashOfMaps<MapData, u32, MapData> = ebpf
            .take_map(map_names::CONNTRACK_PREV)
            .context("map CONNTRACK_PREV missing from the eBPF object")?
            .try_into()?;
        migration.share_conntrack(&mut conntrack_prev);
        let migrated = migration.copy_entries(&mut maps, false);
        let previous = match &opts.bpf_root {
            Some(root) if had_pins && map_names::ALL.iter().any(|n| migration.moved(n)) => {
                // What adopting reads, as the previous programs see it; the
                // rest (not read) from this agent's maps.
                let pin = |name: &str| match name {
                    map_names::SERVICES | map_names::BACKEND_SLOTS | map_names::BACKENDS | map_names::SOURCE_RANGES => {
                        migration.previous_pin(root, name)
                    }
                    _ => root.join(name),
                };
                match BpfMaps::build(|name| super::maps::from_pin_path(&pin(name))) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!("the previous services cannot be read (their ids start afresh): {e:#}");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Datapath {
            ebpf,
            maps,
            pinned: opts.bpf_root.clone(),
            had_pins: had_pins && (previous.is_some() || !map_names::ALL.iter().any(|n| migration.moved(n))),
            migration,
            previous,
            conntrack_prev,
            migrated,
            sock_links: Vec::new(),
        })
    }

    /// Loads the program over the maps a running agent pinned (for `trace`):
    /// nothing is created, pinned or attached.
    pub fn load_existing(opts: &LoadOptions) -> anyhow::Result<Self> {
        let root = opts.bpf_root.as_ref().context("no bpf root")?;
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            let path = root.join(name);
            if !path.exists() {
                bail!("{} missing: is an agent running with this --bpf-root?", path.display());
            }
            loader.map_pin_path(name, path);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context("loading the eBPF object")?;
        load_packet_programs(&mut ebpf)?;
        let maps = BpfMaps::take(&mut ebpf)?;
        let conntrack_prev = ebpf
            .take_map(map_names::CONNTRACK_PREV)
            .context("map CONNTRACK_PREV missing from the eBPF object")?
            .try_into()?;
        Ok(Datapath {
            ebpf,
            maps,
            pinned: None,
            migration: Migration::none(),
            previous: None,
            had_pins: true,
            conntrack_prev,
            migrated: BTreeMap::new(),
            sock_links: Vec::new(),
        })
    }

    /// The bpf root maps and links are pinned under, if any.
    pub fn pin_root(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// The maps an earlier agent left, as its programs see them (some may
    /// have been moved aside for migration), when there are any: the
    /// services and backends to take over with their ids.
    pub fn previous_maps(&self) -> Option<&BpfMaps> {
        self.had_pins.then(|| self.previous.as_ref().unwrap_or(&self.maps))
    }

    /// What start-up's copy (before attaching) did with each migrated map.
    pub fn migrated(&self) -> &BTreeMap<&'static str, CopyReport> {
        &self.migrated
    }

    /// Once the new programs are attached everywhere: the last copy of the
    /// migrated maps' entries, then the maps moved aside are unpinned.
    pub fn finish_migration(&mut self) {
        self.migration.finish(&mut self.maps, &mut self.conntrack_prev);
        self.previous = None;
    }

    pub fn ingress_program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(INGRESS_PROGRAM)
            .context("program lb_ingress missing")?
            .try_into()?)
    }

    pub fn egress_program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(EGRESS_PROGRAM)
            .context("program lb_egress missing")?
            .try_into()?)
    }

    pub fn xdp_program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .context("program lb_xdp missing")?
            .try_into()?)
    }

    /// Removes every pin under the bpf root — maps, links (which detaches
    /// the programs once no process holds them) — and the root itself.
    pub fn remove_pins(&mut self) {
        for link in self.sock_links.drain(..) {
            let _ = link.unpin();
        }
        if let Some(root) = self.pinned.take() {
            let left = remove_pins(&root);
            if !left.is_empty() {
                tracing::warn!("pins left after cleanup: {left}");
            }
        }
    }
}

/// Removes what an agent pinned under `root` (also without a running agent:
/// `lb-agent cleanup`); returns what could not be removed.
pub fn remove_pins(root: &Path) -> super::pins::Leftovers {
    super::pins::remove_pin_tree(root)
}
