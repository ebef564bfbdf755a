//! TC attachment: tcx where the kernel has it (6.6+), clsact otherwise; on
//! every non-loopback interface (or the ones named), including interfaces
//! that appear later (rtnetlink link notifications).

use std::collections::BTreeMap;

use anyhow::Context;
use aya::programs::{SchedClassifier, TcAttachType, tc, tc::SchedClassifierLinkId};
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

/// Which interfaces get the program, and the links made so far.
pub struct Attacher {
    only: Option<Vec<String>>,
    links: BTreeMap<u32, (String, SchedClassifierLinkId)>,
}

impl Attacher {
    /// `only`: attach to these names; None: every non-loopback interface.
    pub fn new(only: Option<Vec<String>>) -> Self {
        Attacher {
            only,
            links: BTreeMap::new(),
        }
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

    /// Attaches to `iface` unless it is unwanted or done already.
    pub fn attach(&mut self, prog: &mut SchedClassifier, iface: &Interface) -> anyhow::Result<()> {
        if !self.wanted(iface) || self.links.contains_key(&iface.index) {
            return Ok(());
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
        info!(interface = %iface.name, index = iface.index, "attached TC ingress");
        self.links.insert(iface.index, (iface.name.clone(), id));
        Ok(())
    }

    /// The interface is gone (its attachment went with it).
    pub fn forget(&mut self, prog: &mut SchedClassifier, index: u32) {
        if let Some((name, id)) = self.links.remove(&index) {
            let _ = prog.detach(id);
            info!(interface = %name, "interface removed");
        }
    }

    pub fn detach_all(&mut self, prog: &mut SchedClassifier) {
        for (_, (name, id)) in std::mem::take(&mut self.links) {
            if let Err(e) = prog.detach(id) {
                warn!(interface = %name, "detach failed: {e}");
            }
        }
    }
}
