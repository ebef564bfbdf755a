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
//! Cluster CIDR 198.18.16.0/20, service CIDR 198.19.0.0/16. Dual-stack:
//! the same with fd00:198:18::{11,12,100,101} on the underlay, pods in
//! fd00:198:18:16::/64 and fd00:198:18:17::/64 (cluster CIDR
//! fd00:198:18:16::/63), services in fd00:198:19::/64.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

use crate::agent::Agent;
use crate::cleanup;
use crate::netns::Netns;
use crate::sandbox::{HTTP_PORT, UDP_PORT, connect_to_node, connect_to_node_v6, make_node};
use crate::servers::Servers;

pub const CLUSTER_CIDR: &str = "198.18.16.0/20";
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
/// Load-balancer and external IPs the external clients route to node 1.
pub const LB_RANGE: &str = "198.19.100.0/23";
pub const CLUSTER_CIDR6: &str = "fd00:198:18:16::/63";
pub const SERVICE_CIDR6: &str = "fd00:198:19::/64";
pub const LB_RANGE6: &str = "fd00:198:19:100::/63";

/// fd00:198:18:<subnet>::<host>: the test's IPv6 nodes, pods and clients.
pub fn addr6(subnet: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x198, 0x18, subnet, 0, 0, 0, host)
}

pub struct ClusterNode {
    pub name: String,
    /// Underlay address.
    pub addr: Ipv4Addr,
    /// Gateway address of its pods (also a node address).
    pub pod_gateway: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub pod_gateway6: Ipv6Addr,
    pub manifests_dir: PathBuf,
    pub bpf_root: PathBuf,
    links: usize,
    pub ns: Netns,
}

pub struct ClusterPod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
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
    /// Further flags of agents started later (e.g. `--forwarding-mode stack`).
    agent_args: Vec<String>,
    pub pods: Vec<ClusterPod>,
    /// External clients (outside the cluster CIDR), by address.
    pub externals: Vec<(Ipv4Addr, Netns)>,
    /// Their IPv6 addresses, in the same order.
    pub externals6: Vec<Ipv6Addr>,
    pub nodes: Vec<ClusterNode>,
    /// Dropped last: the bridge everything hangs on.
    pub underlay: Netns,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Joins `ns` to the underlay bridge as `addr`/24 and `addr6`/64 on interface `ifname`.
fn join_underlay(
    underlay: &Netns,
    port: &str,
    ns: &Netns,
    ifname: &str,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
) -> anyhow::Result<()> {
    underlay.ip(&[
        "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", &ns.name,
    ])?;
    underlay.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
    ns.ip(&["-6", "addr", "add", &format!("{addr6}/64"), "dev", ifname, "nodad"])?;
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
        // No multicast snooping: IPv6 neighbour solicitations go to
        // multicast groups whose MLD reports the bridge may not have seen yet.
        underlay.ip(&["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Cluster {
            id: id.clone(),
            xdp: XdpMode::Off,
            agent_args: Vec::new(),
            pods: Vec::new(),
            externals: Vec::new(),
            externals6: Vec::new(),
            nodes: Vec::new(),
            underlay,
        };
        for i in 0..2u8 {
            let name = format!("node-{}", i + 1);
            let ns = make_node(&format!("{id}-n{}", i + 1))?;
            let addr = Ipv4Addr::new(198, 18, 0, 11 + i);
            let underlay6 = addr6(0, 0x11 + i as u16);
            join_underlay(&cluster.underlay, &format!("u-n{}", i + 1), &ns, "ul0", addr, underlay6)?;
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
                addr6: underlay6,
                pod_gateway6: addr6(0x16 + i as u16, 1),
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
        cluster.nodes[0]
            .ns
            .ip(&["-6", "route", "add", "fd00:198:18:17::/64", "via", "fd00:198:18::12"])?;
        cluster.nodes[1]
            .ns
            .ip(&["-6", "route", "add", "fd00:198:18:16::/64", "via", "fd00:198:18::11"])?;
        for (i, names) in pods.iter().enumerate() {
            for name in names.iter() {
                cluster.add_pod(i, name)?;
            }
        }
        for j in 0..2u8 {
            let ns = Netns::create(&format!("{id}-x{j}"))?;
            let addr = Ipv4Addr::new(198, 18, 0, 100 + j);
            let ext6 = addr6(0, 0x100 + j as u16);
            join_underlay(&cluster.underlay, &format!("u-x{j}"), &ns, "eth0", addr, ext6)?;
            ns.ip(&["route", "add", LB_RANGE, "via", "198.18.0.11"])?;
            ns.ip(&["-6", "route", "add", LB_RANGE6, "via", "fd00:198:18::11"])?;
            cluster.externals.push((addr, ns));
            cluster.externals6.push(ext6);
        }
        Ok(cluster)
    }

    fn add_pod(&mut self, node: usize, name: &str) -> anyhow::Result<()> {
        let n = &mut self.nodes[node];
        let count = self.pods.iter().filter(|p| p.node == node).count() as u8;
        let ip = Ipv4Addr::new(198, 18, 16 + node as u8, 11 + count);
        let ip6 = addr6(0x16 + node as u16, 0x11 + count as u16);
        let ns = Netns::create(&format!("{}-{name}", self.id))?;
        let host_if = format!("veth{}", n.links);
        n.links += 1;
        connect_to_node(&n.ns, &host_if, &ns, ip, n.pod_gateway)?;
        connect_to_node_v6(&n.ns, &host_if, &ns, ip6, n.pod_gateway6)?;
        let servers = Servers::start(&ns, name, HTTP_PORT, UDP_PORT).with_context(|| format!("servers of {name}"))?;
        self.pods.push(ClusterPod {
            name: name.to_string(),
            ip,
            ip6,
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

    /// Agents started later also get `args`.
    pub fn set_agent_args(&mut self, args: &[&str]) {
        self.agent_args = args.iter().map(|a| a.to_string()).collect();
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

    /// The same with the pods' IPv6 addresses.
    pub fn endpoints6(&self, names: &[&str]) -> Vec<(String, Ipv6Addr, String)> {
        names
            .iter()
            .map(|n| {
                let p = self.pod(n);
                (p.name.clone(), p.ip6, self.nodes[p.node].name.clone())
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
            format!("{CLUSTER_CIDR},{CLUSTER_CIDR6}").into(),
            "--service-cluster-ip-range".into(),
            format!("{SERVICE_CIDR},{SERVICE_CIDR6}").into(),
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
        args.extend(self.agent_args.iter().map(Into::into));
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
