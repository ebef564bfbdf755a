//! TC attachment: tcx where the kernel has it (6.6+), clsact otherwise; on
//! every non-loopback interface (or the ones named), including interfaces
//! that appear later (rtnetlink link notifications).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use std::path::PathBuf;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    SchedClassifier, TcAttachType, tc,
    tc::{SchedClassifierLink, SchedClassifierLinkId},
};
use futures::TryStreamExt;
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
    },
};
use tokio::sync::mpsc;
use tracing::{info, warn};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Added(Interface),
    Removed(u32),
    /// An address was added to or removed from some interface.
    AddressesChanged,
}

fn interface(msg: &LinkMessage) -> Option<Interface> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some(Interface {
        index: msg.header.index,
        name,
        loopback: msg.header.flags.contains(LinkFlags::Loopback),
    })
}

/// The interfaces of this network namespace now.
pub async fn list_interfaces() -> anyhow::Result<Vec<Interface>> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(conn);
    let mut links = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = links.try_next().await.context("dumping links")? {
        out.extend(interface(&msg));
    }
    task.abort();
    Ok(out)
}

/// The node's own unicast addresses (no loopback, no link-local): where
/// NodePorts are opened by default.
pub async fn list_addresses() -> anyhow::Result<Vec<std::net::IpAddr>> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(conn);
    let mut addrs = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = addrs.try_next().await.context("dumping addresses")? {
        for attr in msg.attributes {
            let ip = match attr {
                AddressAttribute::Local(ip) => ip,
                AddressAttribute::Address(ip) if ip.is_ipv6() => ip,
                _ => continue,
            };
            let link_local = match ip {
                std::net::IpAddr::V4(v4) => v4.is_link_local(),
                std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
            if !ip.is_loopback() && !link_local && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    task.abort();
    out.sort();
    Ok(out)
}

/// Link additions and removals, and address changes, as they happen.
pub fn watch_interfaces() -> anyhow::Result<mpsc::UnboundedReceiver<LinkEvent>> {
    use futures::StreamExt;
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])
    .context("subscribing to link and address events")?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => interface(&l).map(LinkEvent::Added),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    Some(LinkEvent::Removed(l.header.index))
                }
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_),
                ) => Some(LinkEvent::AddressesChanged),
                _ => None,
            };
            if let Some(e) = event
                && tx.send(e).is_err()
            {
                break;
            }
        }
    });
    Ok(rx)
}

/// Subdirectory of the bpf root where TC and socket-hook links are pinned:
/// pinned links outlive the agent, so the datapath keeps serving while it
/// restarts, and a new agent swaps its program into them atomically.
pub const LINK_DIR: &str = "links";

/// A TC attachment: pinned (tcx link, survives the agent) or held by the
/// program (clsact fallback, or no bpf root).
enum TcAttachment {
    Pinned(PinnedLink),
    InProgram(SchedClassifierLinkId, Option<PathBuf>),
}

/// Which interfaces get the program, and the links made so far.
pub struct Attacher {
    only: Option<Vec<String>>,
    link_dir: Option<PathBuf>,
    links: BTreeMap<u32, (String, TcAttachment)>,
}

impl Attacher {
    /// `only`: attach to these names; None: every non-loopback interface.
    /// `bpf_root`: where links are pinned (None: not pinned).
    pub fn new(only: Option<Vec<String>>, bpf_root: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let link_dir = bpf_root.map(|r| r.join(LINK_DIR));
        if let Some(dir) = &link_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Attacher {
            only,
            link_dir,
            links: BTreeMap::new(),
        })
    }

    fn wanted(&self, iface: &Interface) -> bool {
        match &self.only {
            Some(names) => names.iter().any(|n| n == &iface.name),
            None => !iface.loopback,
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.values().map(|(n, _)| n.as_str())
    }

    fn pin_path(&self, iface: &Interface) -> Option<PathBuf> {
        self.link_dir
            .as_ref()
            .map(|d| d.join(format!("tc-ingress-{}", iface.index)))
    }

    /// Removes pinned links of interfaces that no longer exist.
    pub fn sweep_stale_pins(&self, present: &[Interface]) {
        let Some(dir) = &self.link_dir else { return };
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(index) = name.strip_prefix("tc-ingress-").and_then(|i| i.parse::<u32>().ok()) else {
                continue;
            };
            if !present.iter().any(|i| i.index == index) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Attaches to `iface` unless it is unwanted or done already. A link an
    /// earlier agent pinned for it gets this program atomically.
    pub fn attach(&mut self, prog: &mut SchedClassifier, iface: &Interface) -> anyhow::Result<()> {
        if !self.wanted(iface) || self.links.contains_key(&iface.index) {
            return Ok(());
        }
        let pin = self.pin_path(iface);
        if let Some(path) = &pin
            && path.exists()
        {
            match PinnedLink::from_pin(path) {
                Ok(pinned) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
                    let id = prog
                        .attach_to_link(link)
                        .with_context(|| format!("updating the link on {}", iface.name))?;
                    info!(interface = %iface.name, index = iface.index, "took over the pinned TC link (program replaced atomically)");
                    self.links
                        .insert(iface.index, (iface.name.clone(), TcAttachment::InProgram(id, pin)));
                    return Ok(());
                }
                Err(e) => {
                    warn!(interface = %iface.name, "stale pinned link ({e}); attaching anew");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        // `attach` picks tcx on 6.6+; the netlink (clsact) path needs the qdisc.
        let id = match prog.attach(&iface.name, TcAttachType::Ingress) {
            Ok(id) => id,
            Err(first) => {
                let _ = tc::qdisc_add_clsact(&iface.name);
                prog.attach_with_options(
                    &iface.name,
                    TcAttachType::Ingress,
                    tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
                )
                .with_context(|| format!("attaching to {} (tcx failed first: {first})", iface.name))?
            }
        };
        let attachment = match pin {
            Some(path) => {
                let link = prog.take_link(id)?;
                match FdLink::try_from(link) {
                    Ok(fd_link) => {
                        let pinned = fd_link
                            .pin(&path)
                            .with_context(|| format!("pinning {}", path.display()))?;
                        TcAttachment::Pinned(pinned)
                    }
                    // A netlink (clsact) filter: not a pinnable link.
                    Err(e) => bail!("attached to {} without a link to pin: {e}", iface.name),
                }
            }
            None => TcAttachment::InProgram(id, None),
        };
        info!(interface = %iface.name, index = iface.index, "attached TC ingress");
        self.links.insert(iface.index, (iface.name.clone(), attachment));
        Ok(())
    }

    /// The interface is gone (its attachment went with it).
    pub fn forget(&mut self, prog: &mut SchedClassifier, index: u32) {
        if let Some((name, attachment)) = self.links.remove(&index) {
            detach(prog, attachment);
            info!(interface = %name, "interface removed");
        }
    }

    /// Detaches everywhere and removes the pins.
    pub fn detach_all(&mut self, prog: &mut SchedClassifier) {
        for (_, (_, attachment)) in std::mem::take(&mut self.links) {
            detach(prog, attachment);
        }
    }
}

fn detach(prog: &mut SchedClassifier, attachment: TcAttachment) {
    match attachment {
        TcAttachment::Pinned(pinned) => {
            // Unpinned and closed: the kernel detaches the link.
            let _ = pinned.unpin();
        }
        TcAttachment::InProgram(id, pin) => {
            if let Some(path) = pin {
                let _ = std::fs::remove_file(path);
            }
            if let Err(e) = prog.detach(id) {
                warn!("detach failed: {e}");
            }
        }
    }
}
