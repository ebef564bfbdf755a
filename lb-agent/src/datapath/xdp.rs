//! The XDP fast path's attachments and its egress list. `lb_xdp` runs on
//! the external interfaces named by `--xdp-interfaces`; XDP_EGRESS lists
//! the devices it may send translated frames out of:
//! - generic mode: every interface (generic XDP transmits through the
//!   normal device queue, which any device takes);
//! - native mode: the XDP interfaces themselves (back out, and redirects
//!   between them) plus `--xdp-redirect-interfaces`. A native redirect to a
//!   device that cannot take XDP frames is dropped by the kernel — for a
//!   veth, when its peer has neither GRO nor an XDP program — so such
//!   devices are only listed when the operator says they can.
//!
//! With `--xdp-mode off`, links an earlier agent pinned are removed.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use aya::programs::XdpMode;
use tracing::info;

use super::Datapath;
use super::attach::{Attacher, Interface, XdpHook, interface_exists};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeArg {
    Off,
    Native,
    Generic,
}

pub struct XdpPath {
    mode: XdpModeArg,
    attacher: Attacher<XdpHook>,
    /// Names (a trailing `*`: a prefix) native redirects may go to.
    redirect_to: Vec<String>,
    /// Every interface of the node now, for the generic-mode egress list.
    present: BTreeMap<u32, Interface>,
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl XdpPath {
    pub fn new(
        mode: XdpModeArg,
        interfaces: &[String],
        redirect_to: &[String],
        bpf_root: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let (aya_mode, wanted) = match mode {
            // Wants no interface: stale pins get swept.
            XdpModeArg::Off => (XdpMode::Skb, Vec::new()),
            XdpModeArg::Native => (XdpMode::Driver, interfaces.to_vec()),
            XdpModeArg::Generic => (XdpMode::Skb, interfaces.to_vec()),
        };
        Ok(XdpPath {
            mode,
            attacher: Attacher::new(XdpHook(aya_mode), Some(wanted), bpf_root)?,
            redirect_to: redirect_to.to_vec(),
            present: BTreeMap::new(),
        })
    }

    /// Attaches to the wanted interfaces among `present` (a named XDP
    /// interface that cannot take the program fails start-up). The egress
    /// list is filled by `refresh_egress` (also after a restart, over the
    /// pinned map).
    pub fn start(&mut self, datapath: &mut Datapath, present: &[Interface]) -> anyhow::Result<()> {
        self.attacher.sweep_stale_pins(present);
        self.present = present.iter().map(|i| (i.index, i.clone())).collect();
        for iface in present {
            self.attacher.attach(datapath.xdp_program()?, iface)?;
        }
        if self.mode != XdpModeArg::Off {
            info!(mode = ?self.mode, interfaces = ?self.attacher.attached().collect::<Vec<_>>(), "XDP fast path ready");
        }
        Ok(())
    }

    /// A new interface: attaches if wanted. The caller refreshes the egress
    /// list whatever the outcome.
    pub fn link_added(&mut self, datapath: &mut Datapath, iface: Interface) -> anyhow::Result<()> {
        self.present.insert(iface.index, iface.clone());
        self.attacher
            .attach(datapath.xdp_program()?, &iface)
            .with_context(|| format!("XDP attach to {}", iface.name))
    }

    /// An interface went away. The caller refreshes the egress list.
    pub fn link_removed(&mut self, datapath: &mut Datapath, index: u32) -> anyhow::Result<()> {
        self.present.remove(&index);
        self.attacher.forget(datapath.xdp_program()?, index);
        Ok(())
    }

    /// The interfaces known present (every one, whatever the mode).
    pub fn present(&self) -> impl Iterator<Item = u32> + '_ {
        self.present.keys().copied()
    }

    pub fn detach_all(&mut self, datapath: &mut Datapath) -> anyhow::Result<()> {
        self.attacher.detach_all(datapath.xdp_program()?);
        Ok(datapath.maps.set_xdp_egress(&[])?)
    }

    /// The devices XDP may send frames out of (see the module comment).
    pub fn egress(&self) -> Vec<u32> {
        let mut out: Vec<u32> = match self.mode {
            XdpModeArg::Off => Vec::new(),
            XdpModeArg::Generic => self.present.values().filter(|i| !i.loopback).map(|i| i.index).collect(),
            XdpModeArg::Native => self
                .present
                .values()
                .filter(|i| self.redirect_to.iter().any(|p| matches(p, &i.name)))
                .map(|i| i.index)
                .chain(self.attacher.attached_indexes())
                .collect(),
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Writes the egress list. Interfaces whose write failed because they
    /// are gone (removed before their event was handled) leave the list and
    /// are returned; any other failure is the error.
    pub fn refresh_egress(&mut self, datapath: &mut Datapath) -> (Vec<u32>, anyhow::Result<()>) {
        let Err(mut e) = datapath.maps.set_xdp_egress(&self.egress()) else {
            return (Vec::new(), Ok(()));
        };
        let (vanished, failed): (Vec<_>, Vec<_>) = e.failed.into_iter().partition(|(i, _)| !interface_exists(*i));
        let vanished: Vec<u32> = vanished.into_iter().map(|(i, _)| i).collect();
        for index in &vanished {
            self.present.remove(index);
        }
        e.failed = failed;
        let result = if e.failed.is_empty() { Ok(()) } else { Err(e.into()) };
        (vanished, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str) -> Interface {
        Interface {
            index,
            name: name.into(),
            loopback: name == "lo",
        }
    }

    fn path(mode: XdpModeArg, redirect: &[&str]) -> XdpPath {
        let mut p = XdpPath::new(
            mode,
            &["eth0".into()],
            &redirect.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            None,
        )
        .unwrap();
        p.present = [iface(1, "lo"), iface(2, "eth0"), iface(3, "veth0"), iface(4, "lxc1")]
            .into_iter()
            .map(|i| (i.index, i))
            .collect();
        p
    }

    #[test]
    fn egress_follows_the_mode() {
        assert!(path(XdpModeArg::Off, &["veth*"]).egress().is_empty());
        assert_eq!(path(XdpModeArg::Generic, &[]).egress(), vec![2, 3, 4]);
        // Nothing attached in a unit test: only the named redirect targets.
        assert_eq!(path(XdpModeArg::Native, &["veth*"]).egress(), vec![3]);
        assert_eq!(path(XdpModeArg::Native, &["lxc1", "veth"]).egress(), vec![4]);
        assert!(path(XdpModeArg::Native, &[]).egress().is_empty());
    }
}
