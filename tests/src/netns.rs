//! Named network namespaces (`ip netns`), deleted when dropped, and running
//! code inside one from a thread of this process.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

use anyhow::{Context, bail};

use crate::cleanup;

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// `ip ARGS…`
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        cleanup::track_namespace(name);
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on the interfaces made here: their
        // IPv6 addresses (link-local ones too) are usable at once, instead
        // of after a second of tentative state that loses first packets.
        run(ns.command("sysctl").args([
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]))?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(|_| ())
    }

    /// A command inside the namespace (`nsenter --net`, which keeps /sys/fs/bpf visible).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg("--").arg(program);
        c
    }

    /// Loads `rules` (iptables-save format) with `tool` (e.g.
    /// `iptables-nft-restore`, plus `args` such as `--noflush`) in this namespace.
    pub fn iptables_restore(&self, tool: &str, args: &[&str], rules: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = self
            .command(tool)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {tool}"))?;
        child.stdin.take().context("stdin")?.write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{tool}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        run(self.command("sysctl").args(["-qw", &format!("{key}={value}")])).map(|_| ())
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it
    /// opens live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is valid while `file` lives.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        }))
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
        cleanup::untrack_namespace(&self.name);
    }
}

/// Device offloads the sandbox sets (ethtool's legacy ioctls; no ethtool
/// binary needed).
#[derive(Clone, Copy, Debug)]
pub enum Offload {
    /// Transmit checksum offload. Off: the device sends complete checksums,
    /// as frames from a physical wire have, instead of CHECKSUM_PARTIAL
    /// skbs that only a virtual wire carries.
    TxChecksum,
    /// Generic receive offload. On a veth it also turns on NAPI, which a
    /// veth needs to receive XDP frames redirected to its peer.
    Gro,
}

impl Netns {
    /// Makes the veth end `ifname` behave like a wire for XDP on the far
    /// end: it sends complete checksums (as frames from a NIC have), and
    /// with `takes_xdp_frames` it runs NAPI so XDP frames can be sent to it.
    pub fn wire_for_xdp(&self, ifname: &str, takes_xdp_frames: bool) -> anyhow::Result<()> {
        self.set_offload(ifname, Offload::TxChecksum, false)?;
        if takes_xdp_frames {
            self.set_offload(ifname, Offload::Gro, true)?;
        }
        Ok(())
    }

    /// Turns `offload` on or off on `ifname` in this namespace.
    pub fn set_offload(&self, ifname: &str, offload: Offload, on: bool) -> anyhow::Result<()> {
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        const ETHTOOL_STXCSUM: u32 = 0x17;
        const ETHTOOL_SGRO: u32 = 0x2c;
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        #[repr(C)]
        struct IfReq {
            name: [u8; libc::IFNAMSIZ],
            data: *mut EthtoolValue,
            _pad: [u8; 16],
        }
        let name = ifname.as_bytes();
        if name.len() >= libc::IFNAMSIZ {
            bail!("interface name {ifname:?} too long");
        }
        let cmd = match offload {
            Offload::TxChecksum => ETHTOOL_STXCSUM,
            Offload::Gro => ETHTOOL_SGRO,
        };
        let ifname_owned = ifname.to_string();
        self.run(move || -> anyhow::Result<()> {
            let mut value = EthtoolValue { cmd, data: on as u32 };
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                data: &mut value,
                _pad: [0; 16],
            };
            req.name[..ifname_owned.len()].copy_from_slice(ifname_owned.as_bytes());
            // SAFETY: a datagram socket for the ioctl, closed below; `req`
            // and `value` outlive the call.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                if fd < 0 {
                    bail!("socket: {}", std::io::Error::last_os_error());
                }
                let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if rc != 0 {
                    bail!(
                        "ethtool {offload:?} {} on {ifname_owned}: {err}",
                        if on { "on" } else { "off" }
                    );
                }
            }
            Ok(())
        })?
    }
}
