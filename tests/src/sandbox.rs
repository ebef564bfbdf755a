//! The topology: a node namespace with one veth per pod and per client.
//!
//! ```text
//!  client (198.18.2.10) ──veth── node ──veth── pod nginx-a (198.18.1.11)
//!                                     ├─veth── pod nginx-b (198.18.1.12)
//!                                     └─veth── pod nginx-c (198.18.1.13)
//! ```
//! Every node-side veth carries 198.18.0.1/32 (the pods' and clients'
//! gateway) and a /32 route to its peer; pods and clients route only
//! 198.18.0.0/15 via the node. The node forwards; lb-agent's TC programs
//! on its veths do the service translation.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

use crate::cleanup;
use crate::netns::{Netns, run};
use crate::servers::Servers;

pub const NODE_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_NAME: &str = "node-1";
pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 5353;

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    servers: Option<Servers>,
    pub ns: Netns,
}

pub struct Client {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
}

pub struct Sandbox {
    /// Prefix of every namespace, pin directory and temp directory.
    pub id: String,
    pub pods: Vec<Pod>,
    pub clients: Vec<Client>,
    /// Where the agent reads its manifests.
    pub manifests_dir: PathBuf,
    /// The agent's --bpf-root.
    pub bpf_root: PathBuf,
    links: usize,
    // Dropped last: deleting it removes the veths of pods and clients too.
    pub node: Netns,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Sandbox {
    /// A node with the given pods (servers started) and one client.
    pub fn new(prefix: &str, pod_names: &[&str]) -> anyhow::Result<Self> {
        let id = format!(
            "{prefix}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let manifests_dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&manifests_dir)?;
        cleanup::track_dir(manifests_dir.clone());
        let bpf_root = PathBuf::from("/sys/fs/bpf").join(&id);
        cleanup::track_dir(bpf_root.clone());
        let node = make_node(&format!("{id}-node"))?;
        let mut sandbox = Sandbox {
            id,
            pods: Vec::new(),
            clients: Vec::new(),
            manifests_dir,
            bpf_root,
            links: 0,
            node,
        };
        for name in pod_names {
            sandbox.add_pod(name)?;
        }
        sandbox.add_client("client")?;
        Ok(sandbox)
    }

    /// Connects a new namespace to the node; returns it.
    fn plug(&mut self, name: &str, ip: Ipv4Addr) -> anyhow::Result<Netns> {
        let ns = Netns::create(&format!("{}-{name}", self.id))?;
        let host_if = format!("veth{}", self.links);
        self.links += 1;
        connect_to_node(&self.node, &host_if, &ns, ip, NODE_GATEWAY)?;
        Ok(ns)
    }

    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<&Pod> {
        let ip = Ipv4Addr::new(198, 18, 1, 11 + self.pods.len() as u8);
        let ns = self.plug(name, ip)?;
        let servers = Servers::start(&ns, name, HTTP_PORT, UDP_PORT).with_context(|| format!("servers of {name}"))?;
        self.pods.push(Pod {
            name: name.to_string(),
            ip,
            servers: Some(servers),
            ns,
        });
        Ok(self.pods.last().unwrap())
    }

    pub fn add_client(&mut self, name: &str) -> anyhow::Result<&Client> {
        let ip = Ipv4Addr::new(198, 18, 2, 10 + self.clients.len() as u8);
        let ns = self.plug(name, ip)?;
        self.clients.push(Client {
            name: name.to_string(),
            ip,
            ns,
        });
        Ok(self.clients.last().unwrap())
    }

    /// Readies the wires for XDP (native) on the node's client-side veth
    /// with redirects to the pods, and for XDP frames from the client (a
    /// live-frame generator): see `Netns::wire_for_xdp`.
    pub fn wire_for_xdp(&self) -> anyhow::Result<()> {
        for c in &self.clients {
            c.ns.wire_for_xdp("eth0", true)?;
        }
        for p in &self.pods {
            p.ns.wire_for_xdp("eth0", true)?;
        }
        self.node
            .set_offload(&self.client_host_if(), crate::netns::Offload::Gro, true)
    }

    /// The node-side interface of the first client (`veth<pods>`).
    pub fn client_host_if(&self) -> String {
        format!("veth{}", self.pods.len())
    }

    /// A whole HTTP/1.0 response from 127.0.0.1:`port` in the node
    /// namespace (the agent's /metrics, /healthz, /livez).
    pub fn node_get(&self, port: u16, path: &'static str) -> String {
        self.node
            .run(move || crate::client::raw_http_get(([127, 0, 0, 1], port).into(), path))
            .unwrap()
            .expect("request to the agent")
    }

    pub fn client(&self) -> &Netns {
        &self.clients[0].ns
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Writes a manifest file the agent watches.
    pub fn write_manifest(&self, file: &str, text: &str) -> anyhow::Result<()> {
        // Write then rename, as kubectl-like tools and editors do: the agent
        // never reads half a file.
        let tmp = self.manifests_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests_dir.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.manifests_dir.join(file))?)
    }

    /// NAT rules in the node namespace (iptables-nft, nft, iptables-legacy):
    /// proof that only eBPF translates here. Empty means none.
    pub fn nat_rules(&self) -> anyhow::Result<String> {
        nat_rules_in(&self.node)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Servers first: their sockets keep the pod namespaces alive.
        for pod in &mut self.pods {
            pod.servers.take();
        }
        let _ = std::fs::remove_dir_all(&self.manifests_dir);
        cleanup::untrack_dir(&self.manifests_dir);
        let _ = std::fs::remove_dir_all(&self.bpf_root);
        cleanup::untrack_dir(&self.bpf_root);
    }
}

/// Wires `ns` (a pod or client) to `node` the way CNI plugins like Calico
/// do: a veth whose node side carries `gateway`/32 and a /32 route to `ip`;
/// inside, `ip`/32 on eth0 and 198.18.0.0/15 via the gateway.
pub fn connect_to_node(node: &Netns, host_if: &str, ns: &Netns, ip: Ipv4Addr, gateway: Ipv4Addr) -> anyhow::Result<()> {
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    let gw = gateway.to_string();
    let ip_s = ip.to_string();
    node.ip(&["addr", "add", &format!("{gw}/32"), "dev", host_if])?;
    node.ip(&["link", "set", host_if, "up"])?;
    node.ip(&["route", "add", &format!("{ip_s}/32"), "dev", host_if])?;
    node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter"), "0")?;
    ns.ip(&["addr", "add", &format!("{ip_s}/32"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
    ns.ip(&["route", "add", "198.18.0.0/15", "via", &gw, "dev", "eth0"])?;
    Ok(())
}

/// The IPv6 half of `connect_to_node` on the same veth: the node side
/// carries `gateway`/128 with a /128 route to `ip`; inside, `ip`/128 and
/// fd00:198::/32 via the gateway (ULA only; no DAD, usable at once).
pub fn connect_to_node_v6(
    node: &Netns,
    host_if: &str,
    ns: &Netns,
    ip: Ipv6Addr,
    gateway: Ipv6Addr,
) -> anyhow::Result<()> {
    let (gw, ip_s) = (gateway.to_string(), ip.to_string());
    node.ip(&["-6", "addr", "add", &format!("{gw}/128"), "dev", host_if, "nodad"])?;
    node.ip(&["-6", "route", "add", &format!("{ip_s}/128"), "dev", host_if])?;
    ns.ip(&["-6", "addr", "add", &format!("{ip_s}/128"), "dev", "eth0", "nodad"])?;
    ns.ip(&["-6", "route", "add", &gw, "dev", "eth0"])?;
    ns.ip(&["-6", "route", "add", "fd00:198::/32", "via", &gw, "dev", "eth0"])?;
    Ok(())
}

/// A namespace acting as a node: forwarding on, no reverse-path filter.
pub fn make_node(name: &str) -> anyhow::Result<Netns> {
    let node = Netns::create(name)?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    Ok(node)
}

/// NAT rules in `ns` (nft ruleset, iptables-legacy and iptables-nft nat
/// rules); empty means none.
pub fn nat_rules_in(ns: &Netns) -> anyhow::Result<String> {
    let mut found = String::new();
    let nft = run(ns.command("nft").args(["list", "ruleset"]))?;
    found.push_str(String::from_utf8_lossy(&nft.stdout).trim());
    for tool in ["iptables-legacy-save", "iptables-nft-save"] {
        let out = run(ns.command(tool).args(["-t", "nat"]))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with("-A") {
                found.push_str(line);
                found.push('\n');
            }
        }
    }
    Ok(found)
}
