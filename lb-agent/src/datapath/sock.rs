//! Host-network clients: the cgroup socket hooks (connect4, sendmsg4,
//! recvmsg4, getpeername4) attached to the cgroup2 root, told which network
//! namespace is the node's (its cookie) so they leave every other
//! namespace's sockets alone.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use tracing::info;

use super::Datapath;

/// The socket hook programs in the object.
pub const SOCK_PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
];

/// Where cgroup2 is mounted when the system has no cgroup2 mount.
const OWN_CGROUP2: &str = "/run/lb-agent/cgroup2";

/// getsockopt(SOL_SOCKET, SO_NETNS_COOKIE).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> anyhow::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("a socket to read the netns cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 we own, with its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("SO_NETNS_COOKIE: {}", std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The root of the host's cgroup2 hierarchy, where the socket hooks see
/// every process of the node: `wanted`, else the first cgroup2 mount in
/// /proc/self/mountinfo that is a hierarchy root, else one mounted here.
///
/// A container in its own cgroup namespace (a pod without the host's
/// cgroup2 mounted in) sees its own cgroup as `/`: hooks there would miss
/// every host process, so such a directory is refused with what to do.
pub fn cgroup2_root(wanted: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = wanted {
        return require_hierarchy_root(p);
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let cgroup2_mounts: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            // ... mount-point ... - fstype source options
            let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect();
    if let Some(root) = cgroup2_mounts.iter().find(|p| is_hierarchy_root(p)) {
        return Ok(root.clone());
    }
    match cgroup2_mounts.first() {
        // Only namespaced views: refused, with what to do.
        Some(namespaced) => require_hierarchy_root(namespaced),
        None => {
            mount_own_cgroup2()?;
            require_hierarchy_root(Path::new(OWN_CGROUP2))
        }
    }
}

/// What to do when the socket hooks have no host cgroup root.
const HOST_CGROUP_HINT: &str = "Mount the host's /sys/fs/cgroup into the container (deploy/ does: \
    hostPath /sys/fs/cgroup at /run/lb-agent/host-cgroup) or pass --cgroup-root with the host's cgroup2 mount";

/// Only non-root cgroups have a `cgroup.type` file (cgroup v2).
fn is_hierarchy_root(dir: &Path) -> bool {
    dir.is_dir() && !dir.join("cgroup.type").exists()
}

fn require_hierarchy_root(dir: &Path) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        bail!("cgroup root {}: not a directory (--cgroup-root)", dir.display());
    }
    if !is_hierarchy_root(dir) {
        bail!(
            "cgroup2 at {} is not the root of the host's cgroup hierarchy (it has cgroup.type): \
             in a container with its own cgroup namespace the socket hooks would only see the \
             container's processes, not the node's. {HOST_CGROUP_HINT}",
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// Mounts cgroup2 on OWN_CGROUP2 (for hosts without a cgroup2 mount).
fn mount_own_cgroup2() -> anyhow::Result<()> {
    std::fs::create_dir_all(OWN_CGROUP2).with_context(|| format!("creating {OWN_CGROUP2}"))?;
    let target = std::ffi::CString::new(OWN_CGROUP2)?;
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            bail!("no cgroup2 mount found, and mounting one on {OWN_CGROUP2} failed: {err}. {HOST_CGROUP_HINT}");
        }
    }
    info!(path = OWN_CGROUP2, "mounted cgroup2 for the socket hooks");
    Ok(())
}

impl Datapath {
    /// Attaches the socket hooks (which act on the netns whose cookie is in
    /// CONFIG, see `BpfMaps::write_node_config`) to the cgroup2 root as links (alongside other programs there). With a bpf
    /// root the links are pinned so they outlive the agent; a restarted
    /// agent attaches its own first, then unpins the old ones: no gap.
    pub fn attach_socket_hooks(&mut self, cgroup_root: &Path) -> anyhow::Result<()> {
        let link_dir = self.pin_root().map(|r| r.join(super::attach::LINK_DIR));
        if let Some(dir) = &link_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let cgroup =
            std::fs::File::open(cgroup_root).with_context(|| format!("opening cgroup {}", cgroup_root.display()))?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            // A bpf_link (kernel ≥ 5.7): links coexist with every other
            // program on the cgroup; link creation takes no multi flag.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup_root.display()))?;
            if let Some(dir) = &link_dir {
                let link = FdLink::try_from(prog.take_link(id)?)?;
                let path = dir.join(format!("cgroup-{name}"));
                // The previous agent's hook goes once this one is in place.
                let _ = std::fs::remove_file(&path);
                self.sock_links
                    .push(link.pin(&path).with_context(|| format!("pinning {}", path.display()))?);
            }
        }
        info!(cgroup = %cgroup_root.display(), "socket hooks attached for host-network clients");
        Ok(())
    }
}
