//! Loading the embedded eBPF object and pinning its maps.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use lb_common::map_names;

use super::maps::BpfMaps;

/// The eBPF object built by build.rs from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the TC ingress program in the object.
pub const INGRESS_PROGRAM: &str = "lb_ingress";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Directory on a bpffs where maps are pinned (None: no pins, for tests).
    pub bpf_root: Option<PathBuf>,
    /// CONNTRACK capacity.
    pub conntrack_max: u32,
}

/// A loaded datapath: the program (not yet attached) and its maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: BpfMaps,
    pinned: Option<PathBuf>,
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

impl Datapath {
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        if let Some(root) = &opts.bpf_root {
            std::fs::create_dir_all(root).with_context(|| format!("creating bpf root {}", root.display()))?;
            if !is_bpffs(root) {
                bail!(
                    "{} is not on a bpf file system; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass --bpf-root under it",
                    root.display()
                );
            }
            // Pins left by an agent that died: this agent owns the root.
            for name in map_names::ALL {
                let _ = std::fs::remove_file(root.join(name));
            }
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::CONNTRACK, opts.conntrack_max)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (needs root, BTF and a 6.x kernel)")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(INGRESS_PROGRAM)
            .context("program lb_ingress missing from the object")?
            .try_into()?;
        program.load().context("verifying lb_ingress")?;
        for name in super::sock::SOCK_PROGRAMS {
            let prog: &mut aya::programs::CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        if let Some(root) = &opts.bpf_root {
            for name in map_names::ALL {
                let map = ebpf
                    .map(name)
                    .with_context(|| format!("map {name} missing from the object"))?;
                map.pin(root.join(name))
                    .with_context(|| format!("pinning {name} under {}", root.display()))?;
            }
        }
        let maps = BpfMaps::take(&mut ebpf)?;
        Ok(Datapath {
            ebpf,
            maps,
            pinned: opts.bpf_root.clone(),
        })
    }

    pub fn ingress_program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(INGRESS_PROGRAM)
            .context("program lb_ingress missing")?
            .try_into()?)
    }

    /// Removes the pins (the maps live on only while something holds them).
    pub fn unpin(&mut self) {
        if let Some(root) = self.pinned.take() {
            for name in map_names::ALL {
                let _ = std::fs::remove_file(root.join(name));
            }
            let _ = std::fs::remove_dir(&root);
        }
    }
}
