//! Attachment per interface: TC ingress and egress (tcx where the kernel
//! has it, 6.6+, clsact otherwise) on every non-loopback interface (or the ones named),
//! XDP on the named external interfaces; including interfaces that appear
//! later (rtnetlink link notifications). Links are pinned so they outlive
//! the agent.

use std::collections::BTreeMap;

use anyhow::Context;
use std::path::PathBuf;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode, tc,
    tc::{SchedClassifierLink, SchedClassifierLinkId},
    xdp::{XdpLink, XdpLinkId},
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

/// Does the interface with this index exist (in this namespace) now? An
/// operation on one that failed because it was removed meanwhile (pod
/// churn) is a race, not an error.
pub fn interface_exists(index: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into `name`.
    !unsafe { libc::if_indextoname(index, name.as_mut_ptr()) }.is_null()
}

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

/// A program kind attached per interface through a link that can be pinned
/// and later taken over (TC ingress via tcx, XDP via bpf_link).
pub trait Hook {
    type Program;
    type LinkId;
    /// Pin file name prefix (`<prefix><ifindex>` under LINK_DIR).
    const PIN_PREFIX: &'static str;
    /// For logs.
    const WHAT: &'static str;
    /// Attaches anew.
    fn attach(&self, prog: &mut Self::Program, iface: &Interface) -> anyhow::Result<Self::LinkId>;
    /// Swaps this program into a link an earlier agent pinned.
    fn take_over(prog: &mut Self::Program, pinned: PinnedLink) -> anyhow::Result<Self::LinkId>;
    /// The link behind `id`, to pin (an error if it is not an fd link).
    fn take_fd_link(prog: &mut Self::Program, id: Self::LinkId) -> anyhow::Result<FdLink>;
    fn detach(prog: &mut Self::Program, id: Self::LinkId) -> anyhow::Result<()>;
}

/// TC ingress: tcx where the kernel has it, clsact otherwise.
pub struct TcIngress;

/// TC egress (host-network endpoints' replies, stack forwarding mode), on
/// the same interfaces as TC ingress: tcx, clsact otherwise.
pub struct TcEgress;

/// Attaches a TC program at `side`: `attach` picks tcx on 6.6+; the
/// netlink (clsact) path needs the qdisc.
fn attach_tc(
    prog: &mut SchedClassifier,
    iface: &Interface,
    side: TcAttachType,
) -> anyhow::Result<SchedClassifierLinkId> {
    match prog.attach(&iface.name, side) {
        Ok(id) => Ok(id),
        Err(first) => {
            let _ = tc::qdisc_add_clsact(&iface.name);
            prog.attach_with_options(
                &iface.name,
                side,
                tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
            )
            .with_context(|| format!("attaching to {} (tcx failed first: {first})", iface.name))
        }
    }
}

macro_rules! tc_hook {
    ($hook:ty, $side:expr, $prefix:literal, $what:literal) => {
        impl Hook for $hook {
            type Program = SchedClassifier;
            type LinkId = SchedClassifierLinkId;
            const PIN_PREFIX: &'static str = $prefix;
            const WHAT: &'static str = $what;

            fn attach(&self, prog: &mut SchedClassifier, iface: &Interface) -> anyhow::Result<SchedClassifierLinkId> {
                attach_tc(prog, iface, $side)
            }

            fn take_over(prog: &mut SchedClassifier, pinned: PinnedLink) -> anyhow::Result<SchedClassifierLinkId> {
                Ok(prog.attach_to_link(SchedClassifierLink::try_from(FdLink::from(pinned))?)?)
            }

            fn take_fd_link(prog: &mut SchedClassifier, id: SchedClassifierLinkId) -> anyhow::Result<FdLink> {
                FdLink::try_from(prog.take_link(id)?)
                    .map_err(|e| anyhow::anyhow!("a netlink (clsact) filter, not a link: {e}"))
            }

            fn detach(prog: &mut SchedClassifier, id: SchedClassifierLinkId) -> anyhow::Result<()> {
                Ok(prog.detach(id)?)
            }
        }
    };
}

tc_hook!(TcIngress, TcAttachType::Ingress, "tc-ingress-", "TC ingress");
tc_hook!(TcEgress, TcAttachType::Egress, "tc-egress-", "TC egress");

/// XDP in the given mode; native (driver) mode falls back to generic (skb)
/// where the driver has no XDP support.
pub struct XdpHook(pub XdpMode);

impl Hook for XdpHook {
    type Program = Xdp;
    type LinkId = XdpLinkId;
    const PIN_PREFIX: &'static str = "xdp-";
    const WHAT: &'static str = "XDP";

    fn attach(&self, prog: &mut Xdp, iface: &Interface) -> anyhow::Result<XdpLinkId> {
        match prog.attach_to_if_index(iface.index, self.0) {
            Ok(id) => Ok(id),
            Err(native) if self.0 == XdpMode::Driver => {
                warn!(interface = %iface.name, "no native XDP ({native}); using generic mode there");
                prog.attach_to_if_index(iface.index, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP to {} (native failed first: {native})", iface.name))
            }
            Err(e) => Err(e).with_context(|| format!("attaching XDP ({:?} mode) to {}", self.0, iface.name)),
        }
    }

    fn take_over(prog: &mut Xdp, pinned: PinnedLink) -> anyhow::Result<XdpLinkId> {
        Ok(prog.attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)?)
    }

    fn take_fd_link(prog: &mut Xdp, id: XdpLinkId) -> anyhow::Result<FdLink> {
        FdLink::try_from(prog.take_link(id)?).map_err(|e| anyhow::anyhow!("a netlink XDP attachment, not a link: {e}"))
    }

    fn detach(prog: &mut Xdp, id: XdpLinkId) -> anyhow::Result<()> {
        Ok(prog.detach(id)?)
    }
}

/// An attachment: pinned (survives the agent) or held by the program
/// (clsact fallback, or no bpf root).
enum Attachment<Id> {
    Pinned(PinnedLink),
    InProgram(Id, Option<PathBuf>),
}

/// Which interfaces get the program, and the links made so far.
pub struct Attacher<H: Hook> {
    hook: H,
    only: Option<Vec<String>>,
    link_dir: Option<PathBuf>,
    links: BTreeMap<u32, (String, Attachment<H::LinkId>)>,
}

impl<H: Hook> Attacher<H> {
    /// `only`: attach to these names; None: every non-loopback interface.
    /// `bpf_root`: where links are pinned (None: not pinned).
    pub fn new(hook: H, only: Option<Vec<String>>, bpf_root: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let link_dir = bpf_root.map(|r| r.join(LINK_DIR));
        if let Some(dir) = &link_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Attacher {
            hook,
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

    pub fn attached_indexes(&self) -> impl Iterator<Item = u32> + '_ {
        self.links.keys().copied()
    }

    fn pin_path(&self, iface: &Interface) -> Option<PathBuf> {
        self.link_dir
            .as_ref()
            .map(|d| d.join(format!("{}{}", H::PIN_PREFIX, iface.index)))
    }

    /// Removes pinned links of interfaces that no longer exist, or that this
    /// agent does not want (e.g. XDP turned off): unpinning detaches them.
    pub fn sweep_stale_pins(&self, present: &[Interface]) {
        let Some(dir) = &self.link_dir else { return };
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(index) = name.strip_prefix(H::PIN_PREFIX).and_then(|i| i.parse::<u32>().ok()) else {
                continue;
            };
            if !present.iter().any(|i| i.index == index && self.wanted(i)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Attaches to `iface` unless it is unwanted or done already. A link an
    /// earlier agent pinned for it gets this program atomically.
    pub fn attach(&mut self, prog: &mut H::Program, iface: &Interface) -> anyhow::Result<()> {
        if !self.wanted(iface) || self.links.contains_key(&iface.index) {
            return Ok(());
        }
        let pin = self.pin_path(iface);
        if let Some(path) = &pin
            && path.exists()
        {
            match PinnedLink::from_pin(path) {
                Ok(pinned) => {
                    let id = H::take_over(prog, pinned)
                        .with_context(|| format!("updating the {} link on {}", H::WHAT, iface.name))?;
                    info!(interface = %iface.name, index = iface.index, "took over the pinned {} link (program replaced atomically)", H::WHAT);
                    self.links
                        .insert(iface.index, (iface.name.clone(), Attachment::InProgram(id, pin)));
                    return Ok(());
                }
                Err(e) => {
                    warn!(interface = %iface.name, "stale pinned {} link ({e}); attaching anew", H::WHAT);
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let id = self.hook.attach(prog, iface)?;
        let attachment = match pin {
            Some(path) => {
                let fd_link = H::take_fd_link(prog, id)
                    .with_context(|| format!("attached {} to {} without a link to pin", H::WHAT, iface.name))?;
                let pinned = fd_link
                    .pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                Attachment::Pinned(pinned)
            }
            None => Attachment::InProgram(id, None),
        };
        info!(interface = %iface.name, index = iface.index, "attached {}", H::WHAT);
        self.links.insert(iface.index, (iface.name.clone(), attachment));
        Ok(())
    }

    /// The interface is gone (its attachment went with it).
    pub fn forget(&mut self, prog: &mut H::Program, index: u32) {
        if let Some((name, attachment)) = self.links.remove(&index) {
            detach::<H>(prog, attachment);
            info!(interface = %name, "interface removed");
        }
    }

    /// Detaches everywhere and removes the pins.
    pub fn detach_all(&mut self, prog: &mut H::Program) {
        for (_, (_, attachment)) in std::mem::take(&mut self.links) {
            detach::<H>(prog, attachment);
        }
    }
}

fn detach<H: Hook>(prog: &mut H::Program, attachment: Attachment<H::LinkId>) {
    match attachment {
        Attachment::Pinned(pinned) => {
            // Unpinned and closed: the kernel detaches the link.
            let _ = pinned.unpin();
        }
        Attachment::InProgram(id, pin) => {
            if let Some(path) = pin {
                let _ = std::fs::remove_file(path);
            }
            if let Err(e) = H::detach(prog, id) {
                warn!("{} detach failed: {e}", H::WHAT);
            }
        }
    }
}
