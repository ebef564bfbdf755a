//! A two-node cluster of network namespaces for NodePort / masquerade /
//! traffic-policy tests: nodes on a bridged underlay, pods on both nodes
//! routed across it, external clients on the underlay that know only the
//! nodes (and the load-balancer / external IPs, routed to node 1).
//!
//! ```text
//!  ext-0 198.18.0.100 ─┐            ┌─ node-1 198.18.0.11 ── pods 198.18.16.0/24
//!  ext-1 198.18.0.101 ─┼── br0 ─────┤
//!                      │  (underlay)└─ node-2 198.18.0.12 ── pods 198.18.17.0/24
//! ```
//! Cluster CIDR 198.18.16.0/20, service CIDR 198.19.0.0/16.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

use crate::agent::Agent;
use crate::cleanup;
use crate::netns::Netns;
use crate::sandbox::{HTTP_PORT, UDP_PORT, connect_to_node, make_node};
use crate::servers::Servers;

pub const CLUSTER_CIDR: &str = "198.18.16.0/20";
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
/// Load-balancer and external IPs the external clients route to node 1.
pub const LB_RANGE: &str = "198.19.100.0/23";

pub struct ClusterNode {
    pub name: String,
    /// Underlay address.
    pub addr: Ipv4Addr,
    /// Gateway address of its pods (also a node address).
    pub pod_gateway: Ipv4Addr,
    pub manifests_dir: PathBuf,
    pub bpf_root: PathBuf,
    links: usize,
    pub ns: Netns,
}

pub struct ClusterPod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Index into `Cluster::nodes`.
    pub node: usize,
    servers: Option<Servers>,
    pub ns: Netns,
}

/// How the agents run the XDP fast path on the nodes' underlay interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Off,
    Native,
    Generic,
}

pub struct Cluster {
    pub id: String,
    xdp: XdpMode,
    pub pods: Vec<ClusterPod>,
    /// External clients (outside the cluster CIDR), by address.
    pub externals: Vec<(Ipv4Addr, Netns)>,
    pub nodes: Vec<ClusterNode>,
    /// Dropped last: the bridge everything hangs on.
    pub underlay: Netns,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Joins `ns` to the underlay bridge as `addr`/24 on interface `ifname`.
fn join_underlay(underlay: &Netns, port: &str, ns: &Netns, ifname: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
    underlay.ip(&[
        "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", &ns.name,
    ])?;
    underlay.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(())
}

impl Cluster {
    /// Two nodes; `pods[i]` are the pods of node i+1; two external clients.
    pub fn new(pods: [&[&str]; 2]) -> anyhow::Result<Self> {
        let id = format!(
            "lbt-{}-c{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let underlay = Netns::create(&format!("{id}-net"))?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Cluster {
            id: id.clone(),
            xdp: XdpMode::Off,
            pods: Vec::new(),
            externals: Vec::new(),
            nodes: Vec::new(),
            underlay,
        };
        for i in 0..2u8 {
            let name = format!("node-{}", i + 1);
            let ns = make_node(&format!("{id}-n{}", i + 1))?;
            let addr = Ipv4Addr::new(198, 18, 0, 11 + i);
            join_underlay(&cluster.underlay, &format!("u-n{}", i + 1), &ns, "ul0", addr)?;
            ns.sysctl("net.ipv4.conf.ul0.rp_filter", "0")?;
            let manifests_dir = std::env::temp_dir().join(format!("{id}-n{}", i + 1));
            std::fs::create_dir_all(&manifests_dir)?;
            cleanup::track_dir(manifests_dir.clone());
            let bpf_root = PathBuf::from("/sys/fs/bpf").join(format!("{id}-n{}", i + 1));
            cleanup::track_dir(bpf_root.clone());
            cluster.nodes.push(ClusterNode {
                name,
                addr,
                pod_gateway: Ipv4Addr::new(198, 18, 16 + i, 1),
                manifests_dir,
                bpf_root,
                links: 0,
                ns,
            });
        }
        // Pod routes across the underlay.
        cluster.nodes[0]
            .ns
            .ip(&["route", "add", "198.18.17.0/24", "via", "198.18.0.12"])?;
        cluster.nodes[1]
            .ns
            .ip(&["route", "add", "198.18.16.0/24", "via", "198.18.0.11"])?;
        for (i, names) in pods.iter().enumerate() {
            for name in names.iter() {
                cluster.add_pod(i, name)?;
            }
        }
        for j in 0..2u8 {
            let ns = Netns::create(&format!("{id}-x{j}"))?;
            let addr = Ipv4Addr::new(198, 18, 0, 100 + j);
            join_underlay(&cluster.underlay, &format!("u-x{j}"), &ns, "eth0", addr)?;
            ns.ip(&["route", "add", LB_RANGE, "via", "198.18.0.11"])?;
            cluster.externals.push((addr, ns));
        }
        Ok(cluster)
    }

    fn add_pod(&mut self, node: usize, name: &str) -> anyhow::Result<()> {
        let n = &mut self.nodes[node];
        let count = self.pods.iter().filter(|p| p.node == node).count() as u8;
        let ip = Ipv4Addr::new(198, 18, 16 + node as u8, 11 + count);
        let ns = Netns::create(&format!("{}-{name}", self.id))?;
        let host_if = format!("veth{}", n.links);
        n.links += 1;
        connect_to_node(&n.ns, &host_if, &ns, ip, n.pod_gateway)?;
        let servers = Servers::start(&ns, name, HTTP_PORT, UDP_PORT).with_context(|| format!("servers of {name}"))?;
        self.pods.push(ClusterPod {
            name: name.to_string(),
            ip,
            node,
            servers: Some(servers),
            ns,
        });
        Ok(())
    }

    /// Agents started later run XDP on `ul0` in `mode`. The virtual wires
    /// are made to behave like physical ones: every sender's veth transmits
    /// complete checksums (XDP sees frames as a NIC delivers them, never a
    /// CHECKSUM_PARTIAL skb), and in native mode the veths XDP sends into
    /// (the nodes' bridge ports, the pods' ends) run NAPI to take XDP frames.
    pub fn enable_xdp(&mut self, mode: XdpMode) -> anyhow::Result<()> {
        self.xdp = mode;
        let native = mode == XdpMode::Native;
        for (_, ns) in &self.externals {
            ns.wire_for_xdp("eth0", false)?;
        }
        for pod in &self.pods {
            pod.ns.wire_for_xdp("eth0", native)?;
        }
        if native {
            for i in 1..=self.nodes.len() {
                self.underlay
                    .set_offload(&format!("u-n{i}"), crate::netns::Offload::Gro, true)?;
            }
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &ClusterPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// (pod name, IP, node name) of every pod: EndpointSlice material.
    pub fn endpoints(&self, names: &[&str]) -> Vec<(String, Ipv4Addr, String)> {
        names
            .iter()
            .map(|n| {
                let p = self.pod(n);
                (p.name.clone(), p.ip, self.nodes[p.node].name.clone())
            })
            .collect()
    }

    /// Writes the same manifest file on every node (as every kube-proxy
    /// sees the same API objects).
    pub fn write_manifest(&self, file: &str, text: &str) -> anyhow::Result<()> {
        for n in &self.nodes {
            std::fs::write(n.manifests_dir.join(file), text)?;
        }
        Ok(())
    }

    /// One agent per node, on its manifests, with the cluster's CIDRs.
    pub fn start_agents(&self, echo: bool) -> anyhow::Result<Vec<Agent>> {
        let spawned = (0..self.nodes.len())
            .map(|i| self.spawn_agent(i, echo))
            .collect::<anyhow::Result<Vec<_>>>()?;
        spawned.into_iter().map(Agent::ready).collect()
    }

    /// The agent of node `i`, started and ready.
    pub fn start_agent(&self, i: usize, echo: bool) -> anyhow::Result<Agent> {
        self.spawn_agent(i, echo)?.ready()
    }

    fn spawn_agent(&self, i: usize, echo: bool) -> anyhow::Result<Agent> {
        let n = &self.nodes[i];
        let mut args: Vec<std::ffi::OsString> = vec![
            "--manifests".into(),
            n.manifests_dir.clone().into(),
            "--cluster-cidr".into(),
            CLUSTER_CIDR.into(),
            "--service-cluster-ip-range".into(),
            SERVICE_CIDR.into(),
        ];
        let xdp_mode = match self.xdp {
            XdpMode::Off => None,
            XdpMode::Native => Some("native"),
            XdpMode::Generic => Some("generic"),
        };
        if let Some(mode) = xdp_mode {
            // Pods' host-side veths are veth0, veth1, ... (their peers take XDP frames).
            for a in [
                "--xdp-mode",
                mode,
                "--xdp-interfaces",
                "ul0",
                "--xdp-redirect-interfaces",
                "veth*",
            ] {
                args.push(a.into());
            }
        }
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        Agent::spawn_in(&n.ns, &n.name, &n.bpf_root, &args, echo)
    }

    /// Does node `i`'s underlay interface run an XDP program now?
    pub fn xdp_attached(&self, i: usize) -> anyhow::Result<bool> {
        let out = crate::netns::run(self.nodes[i].ns.command("ip").args(["link", "show", "ul0"]))?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
    }

    /// NAT rules in any node namespace (there must be none).
    pub fn nat_rules(&self) -> anyhow::Result<String> {
        let mut all = String::new();
        for n in &self.nodes {
            all.push_str(&crate::sandbox::nat_rules_in(&n.ns)?);
        }
        Ok(all)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            pod.servers.take();
        }
        for n in &self.nodes {
            let _ = std::fs::remove_dir_all(&n.manifests_dir);
            cleanup::untrack_dir(&n.manifests_dir);
            let _ = std::fs::remove_dir_all(&n.bpf_root);
            cleanup::untrack_dir(&n.bpf_root);
        }
    }
}
