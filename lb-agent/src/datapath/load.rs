//! Loading the embedded eBPF object and pinning its maps.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp},
};
use lb_common::map_names;

use super::maps::BpfMaps;

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
    reused_pins: bool,
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

/// What the pinned maps' layout must match to be reused: every shared type's
/// size and every map's capacity. A different agent version with another
/// layout starts from fresh maps instead of misreading old ones.
fn layout_signature(opts: &LoadOptions) -> String {
    use lb_common::*;
    use std::mem::size_of;
    format!(
        "v1 svc={}/{} slot={} be={} ct={}/{} aff={}/{} sr={} cfg={} rev={}/{} limits={}/{}/{}/{}/{}/{}/{}/{}/{} sizes={}/{}/{}",
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
        size_of::<BackendSlotKey>(),
        size_of::<Backend>(),
        size_of::<CtKey>(),
        size_of::<CtEntry>(),
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
        size_of::<SourceRange>(),
        size_of::<sock::NodeConfig>(),
        size_of::<sock::SockNatKey>(),
        size_of::<sock::SockRevNat>(),
        limits::MAX_SERVICES,
        limits::MAX_BACKENDS,
        limits::MAX_BACKEND_SLOTS,
        limits::MAX_AFFINITY,
        limits::MAX_CIDRS,
        limits::MAX_SOURCE_RANGES,
        limits::MAX_SOCK_REVNAT,
        limits::DROP_REASONS,
        limits::FLOW_EVENTS,
        opts.conntrack_max,
        opts.max_services,
        opts.max_backends,
    )
}

/// FNV-1a: a stable hash for the layout marker's name.
fn fnv64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Bpffs holds only BPF objects and directories: the layout is recorded as
/// the name of an empty directory.
fn layout_marker(root: &Path, opts: &LoadOptions) -> PathBuf {
    root.join(format!("layout-{:016x}", fnv64(&layout_signature(opts))))
}

fn remove_layout_markers(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("layout-") {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Prepares `root` for reuse: maps pinned there by an earlier agent are
/// kept (a restart keeps conntrack, affinity and counters) when their
/// layout matches this agent's, and removed otherwise.
fn prepare_pins(root: &Path, opts: &LoadOptions) -> anyhow::Result<bool> {
    std::fs::create_dir_all(root).with_context(|| format!("creating bpf root {}", root.display()))?;
    if !is_bpffs(root) {
        bail!(
            "{} is not on a bpf file system; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass --bpf-root under it",
            root.display()
        );
    }
    let marker = layout_marker(root, opts);
    let reuse = marker.is_dir();
    if !reuse {
        for name in map_names::ALL {
            let _ = std::fs::remove_file(root.join(name));
        }
        remove_layout_markers(root);
        std::fs::create_dir(&marker).with_context(|| format!("creating {}", marker.display()))?;
    }
    Ok(reuse)
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
        loader.map_max_entries(map_names::CONNTRACK, opts.conntrack_max);
        loader.map_max_entries(map_names::SERVICES, opts.max_services);
        loader.map_max_entries(map_names::SERVICE_STATS, opts.max_services);
        loader.map_max_entries(map_names::BACKENDS, opts.max_backends);
        loader.map_max_entries(map_names::BACKEND_STATS, opts.max_backends);
        loader.map_max_entries(map_names::BACKEND_SLOTS, opts.max_backends.saturating_mul(2));
        let mut reused = false;
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.bpf_root {
            Some(root) => {
                reused = prepare_pins(root, opts)?;
                map_names::ALL.iter().map(|n| (*n, root.join(n))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            // Reuses the pinned map when there is one, else creates and pins it.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (needs root, BTF and a 6.x kernel)")?;
        load_packet_programs(&mut ebpf)?;
        for name in super::sock::SOCK_PROGRAMS {
            let prog: &mut aya::programs::CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        let maps = BpfMaps::take(&mut ebpf)?;
        Ok(Datapath {
            ebpf,
            maps,
            pinned: opts.bpf_root.clone(),
            reused_pins: reused,
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
        Ok(Datapath {
            ebpf,
            maps,
            pinned: None,
            reused_pins: true,
            sock_links: Vec::new(),
        })
    }

    /// The bpf root maps and links are pinned under, if any.
    pub fn pin_root(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// Were the maps taken over from an earlier agent?
    pub fn reused_pins(&self) -> bool {
        self.reused_pins
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
