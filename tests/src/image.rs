//! The agent's OCI image, built here from what this repository builds and
//! nothing pulled from a registry: `FROM scratch` plus the agent binary
//! and exactly the shared libraries the dynamic loader needs for it (from
//! `ldd`). Used by `cargo xtask image` (release binary) and the container
//! tests (the debug binary the other tests run too).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Where the agent lives in the image.
pub const AGENT_PATH: &str = "/usr/local/bin/lb-agent";

/// Debian's CA bundle (package ca-certificates), copied into the image.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// podman's global flags on this machine kind: runc (crun refuses the
/// hybrid cgroup layout of the VM).
pub const PODMAN_GLOBAL: &[&str] = &["--runtime", "runc"];

/// Is podman usable here? (`None`: yes; `Some(why)`: no.)
pub fn podman_missing() -> Option<String> {
    match Command::new("podman").args(PODMAN_GLOBAL).arg("version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "podman version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("podman not found ({e}): `cargo xtask setup` installs it")),
    }
}

/// `podman ARGS` with the global flags; fails with its stderr.
pub fn podman(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("podman")
        .args(PODMAN_GLOBAL)
        .args(args)
        .output()
        .context("running podman")?;
    if !out.status.success() {
        bail!(
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The files the loader needs for `binary`: every `=> /path` and the
/// loader itself, as `ldd` lists them. A static binary needs none.
pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
            return Ok(Vec::new());
        }
        bail!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" is the kernel's.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// What `lb-agent cleanup --cleanup-kube-proxy` runs (kube-proxy's rules
/// live in iptables-legacy, iptables-nft — both families, read with *-save
/// and removed with *-restore — and nftables): the image carries
/// them, with what the loader needs and iptables' extension modules.
const CLEANUP_TOOLS: &[&str] = &[
    "iptables-legacy",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "iptables-nft",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "nft",
];
/// Where the tools are looked up on the build host and put in the image.
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin"];
/// iptables' match and target modules (loaded with dlopen: not in ldd).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Lays out the image's file system under `rootfs`: the agent (debug
/// sections stripped), the shared libraries it and the cleanup tools need,
/// the tools, the CA bundle and the directories the pod spec mounts over.
/// `cargo xtask image` and deploy/Dockerfile both use this.
pub fn assemble_rootfs(binary: &Path, rootfs: &Path) -> anyhow::Result<()> {
    if !binary.exists() {
        bail!("{} not found: build the agent first", binary.display());
    }
    let place = |from: &Path, to: &Path| -> anyhow::Result<()> {
        let dest = rootfs.join(to.strip_prefix("/").unwrap_or(to));
        std::fs::create_dir_all(dest.parent().context("file in a directory")?)?;
        // Follows symlinks: the image gets the file itself under the name
        // asked for (multi-call binaries dispatch on that name).
        std::fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    };
    place(binary, Path::new(AGENT_PATH))?;
    // Debug sections are most of a debug build; the image needs none.
    let agent = rootfs.join(AGENT_PATH.trim_start_matches('/'));
    let stripped = Command::new("strip").arg("--strip-debug").arg(&agent).status();
    if !stripped.is_ok_and(|s| s.success()) {
        bail!("strip --strip-debug {} failed (binutils)", agent.display());
    }
    let mut needs_libs = vec![binary.to_path_buf()];
    for tool in CLEANUP_TOOLS {
        let Some(found) = TOOL_DIRS.iter().map(|d| Path::new(d).join(tool)).find(|p| p.exists()) else {
            bail!("{tool} not found in {TOOL_DIRS:?}: install iptables and nftables (`cargo xtask setup` does)");
        };
        place(&found, &Path::new("/usr/sbin").join(tool))?;
        needs_libs.push(found);
    }
    for module in std::fs::read_dir(XTABLES_DIR).with_context(|| format!("reading {XTABLES_DIR}"))? {
        let module = module?.path();
        place(&module, &module)?;
    }
    let mut libs = std::collections::BTreeSet::new();
    for b in &needs_libs {
        libs.extend(shared_libraries(b)?);
    }
    for lib in &libs {
        place(lib, lib)?;
    }
    // TLS roots for an API server reached without a service account's
    // CA (e.g. --master with a kubeconfig-less setup): the host's bundle.
    let bundle = Path::new(CA_BUNDLE);
    if bundle.exists() {
        place(bundle, bundle)?;
    }
    // Where the agent pins and mounts (the pod spec mounts over them), and
    // iptables' lock file.
    for dir in ["sys/fs/bpf", "run/lb-agent", "etc/lb-agent", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    Ok(())
}

/// The image's Containerfile: the assembled rootfs and nothing else.
pub const CONTAINERFILE: &str = "# Generated by lb_tests::image: the agent, its shared libraries and the cleanup tools only.\n\
     FROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/local/bin:/usr/sbin:/usr/bin\n\
     ENTRYPOINT [\"/usr/local/bin/lb-agent\"]\nCMD [\"run\"]\n";

/// Builds image `tag` around `binary`; returns the image id.
pub fn build(binary: &Path, tag: &str) -> anyhow::Result<String> {
    let context = std::env::temp_dir().join(format!("lb-agent-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&context);
    let result = (|| {
        assemble_rootfs(binary, &context.join("rootfs"))?;
        std::fs::write(context.join("Containerfile"), CONTAINERFILE)?;
        let context_str = context.to_str().context("UTF-8 temp dir")?;
        podman(&[
            "build",
            "--network",
            "none",
            "--pull=never",
            "--quiet",
            "-t",
            tag,
            "-f",
            &format!("{context_str}/Containerfile"),
            context_str,
        ])
        .map(|id| id.trim().to_string())
    })();
    let _ = std::fs::remove_dir_all(&context);
    result
}
