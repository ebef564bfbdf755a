//! `cargo xtask bench`: this datapath against kube-proxy's, side by side in
//! one run, on the same netns topology (client → node → 3 pods), for N
//! services. kube-proxy's datapath is rebuilt as its iptables rules
//! (KUBE-SERVICES / KUBE-NODEPORTS / KUBE-EXT / KUBE-SVC / KUBE-SVL /
//! KUBE-SEP / KUBE-MARK-MASQ / KUBE-POSTROUTING) with iptables-nft and
//! iptables-legacy; "plain forwarding" is the node routing to a pod with no
//! rules at all, and the "bare XDP redirect" ceiling sends every frame from
//! the client's veth straight to a pod's (UDP only).
//!
//! Per datapath and N: time to program, agent RSS and BPF map memory, new
//! TCP connections per second through the last service's NodePort
//! (masqueraded, 32 clients, client closes first) with p50/p99, one TCP
//! stream's throughput, and UDP packets per second with a new flow in every
//! packet (XDP live-frame generator; NodePort with externalTrafficPolicy
//! Local, so DNAT only). For ours also: program cost in ns/packet
//! (BPF_PROG_TEST_RUN), and at every N the latency and CPU time of one endpoint
//! change and, for iptables, of the equivalent iptables-restore.
//! Writes bench/results/latest.md and bench/results/latest.svg.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lb_tests::manifests::{ServiceDef, example_pods, nginx_service, typed_service, udp_service};
use lb_tests::sandbox::{NODE_GATEWAY, UDP_PORT};
use lb_tests::{Agent, Sandbox, cleanup};

use crate::step;

const CLIENTS: usize = 32;
/// MiB of the single-stream download.
const STREAM_MIB: usize = 256;
/// Endpoint changes timed at each N.
const ENDPOINT_CHANGES: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Datapath {
    Plain,
    Ceiling,
    IptablesNft,
    IptablesLegacy,
    Tc,
    Xdp,
}

impl Datapath {
    /// The `--only` name.
    fn key(self) -> &'static str {
        match self {
            Datapath::Plain => "plain",
            Datapath::Ceiling => "ceiling",
            Datapath::IptablesNft => "nft",
            Datapath::IptablesLegacy => "legacy",
            Datapath::Tc => "tc",
            Datapath::Xdp => "xdp",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Datapath::Plain => "plain forwarding (no rules, to a pod)",
            Datapath::Ceiling => "bare XDP redirect (ceiling)",
            Datapath::IptablesNft => "kube-proxy rules, iptables-nft",
            Datapath::IptablesLegacy => "kube-proxy rules, iptables-legacy",
            Datapath::Tc => "lb (eBPF, TC)",
            Datapath::Xdp => "lb (eBPF, XDP native + TC)",
        }
    }
}

const ALL: [Datapath; 6] = [
    Datapath::Plain,
    Datapath::Ceiling,
    Datapath::IptablesNft,
    Datapath::IptablesLegacy,
    Datapath::Tc,
    Datapath::Xdp,
];

/// Cluster IP of service `i`: 250 per /24 in 198.19.0.0/16 (64,000), then
/// in 198.18.16.0 and up — clear of the nodes, pods and clients (198.18.0-2.x).
fn vip(i: usize) -> Ipv4Addr {
    let (net, i) = if i < 64_000 {
        (19, i)
    } else {
        (18, i - 64_000 + 16 * 250)
    };
    Ipv4Addr::new(198, net, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Services the benchmark can create.
const MAX_SERVICES: usize = 100_000;
/// NodePorts it hands out, from 30000 up (a widened
/// --service-node-port-range, as large clusters use): the last services
/// get one — the measured ones are the last — earlier ones are ClusterIP only.
const NODE_PORTS: usize = 20_000;

/// The NodePort of service `i` of a run with `n` services (`n`: the UDP
/// service, `n + 1`: the changing one), if it has one.
fn node_port(i: usize, n: usize) -> Option<u16> {
    let first = (n + 2).saturating_sub(NODE_PORTS);
    (i >= first).then(|| 30000 + (i - first) as u16)
}

/// The NodePort of one of the last services (they all have one).
fn last_node_port(i: usize, n: usize) -> u16 {
    node_port(i, n).expect("the last services have NodePorts")
}

fn svc_name(i: usize) -> &'static str {
    Box::leak(format!("svc-{i}").into_boxed_str())
}

/// N NodePort services on the three pods (the seed's nginx service, TCP
/// 8080 → 80, renamed and readdressed), then the UDP service of the pps
/// test (externalTrafficPolicy Local: no masquerade).
fn manifests(n: usize, pods: &[(String, Ipv4Addr)]) -> String {
    let mut docs: Vec<String> = (0..n)
        .map(|i| {
            let def = ServiceDef {
                name: svc_name(i),
                cluster_ip: vip(i),
                ..nginx_service(pods)
            };
            match node_port(i, n) {
                Some(port) => typed_service(&def, "NodePort", Some(port)),
                None => typed_service(&def, "ClusterIP", None),
            }
        })
        .collect();
    let udp = ServiceDef {
        name: "udp-bench",
        cluster_ip: vip(n),
        ..udp_service(pods)
    };
    docs.push(typed_service(&udp, "NodePort", Some(last_node_port(n, n))).replacen(
        "  type: NodePort\n",
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
        1,
    ));
    lb_tests::manifests::join(&docs)
}

/// kube-proxy's iptables-mode chains of service `i` (TCP, eTP Cluster)
/// with these endpoints, and its KUBE-SERVICES / KUBE-NODEPORTS rules.
fn service_chains(r: &mut String, i: usize, pods: &[(String, Ipv4Addr)]) {
    let _ = writeln!(r, "-A KUBE-EXT-{i} -j KUBE-MARK-MASQ\n-A KUBE-EXT-{i} -j KUBE-SVC-{i}");
    endpoint_rules(r, &format!("KUBE-SVC-{i}"), &format!("KUBE-SEP-{i}"), "tcp", 80, pods);
}

/// The random cascade over endpoints and their DNAT rules.
fn endpoint_rules(r: &mut String, svc: &str, sep: &str, proto: &str, port: u16, pods: &[(String, Ipv4Addr)]) {
    let k = pods.len();
    for (j, (_, ip)) in pods.iter().enumerate() {
        let left = k - j;
        if left > 1 {
            let _ = writeln!(
                r,
                "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}-{j}",
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(r, "-A {svc} -j {sep}-{j}");
        }
        let _ = writeln!(
            r,
            "-A {sep}-{j} -p {proto} -m {proto} -j DNAT --to-destination {ip}:{port}"
        );
    }
}

/// kube-proxy's iptables-mode rules for the same services.
fn iptables_rules(n: usize, pods: &[(String, Ipv4Addr)]) -> String {
    let mut r = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for i in 0..n {
        let _ = writeln!(r, ":KUBE-SVC-{i} - [0:0]\n:KUBE-EXT-{i} - [0:0]");
        for j in 0..pods.len() {
            let _ = writeln!(r, ":KUBE-SEP-{i}-{j} - [0:0]");
        }
    }
    r.push_str(":KUBE-EXT-U - [0:0]\n:KUBE-SVL-U - [0:0]\n");
    for j in 0..pods.len() {
        let _ = writeln!(r, ":KUBE-SEP-U-{j} - [0:0]");
    }
    r.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    r.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    r.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    r.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    r.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    r.push_str("-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n");
    r.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    for i in 0..n {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 8080 -j KUBE-SVC-{i}",
            vip(i)
        );
        if let Some(port) = node_port(i, n) {
            let _ = writeln!(r, "-A KUBE-NODEPORTS -p tcp -m tcp --dport {port} -j KUBE-EXT-{i}");
        }
        service_chains(&mut r, i, pods);
    }
    // The UDP service, externalTrafficPolicy Local: local endpoints, no masquerade.
    let _ = writeln!(
        r,
        "-A KUBE-NODEPORTS -p udp -m udp --dport {} -j KUBE-EXT-U",
        last_node_port(n, n)
    );
    r.push_str("-A KUBE-EXT-U -s 127.0.0.0/8 -j KUBE-MARK-MASQ\n-A KUBE-EXT-U -j KUBE-SVL-U\n");
    endpoint_rules(&mut r, "KUBE-SVL-U", "KUBE-SEP-U", "udp", UDP_PORT, pods);
    r.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");
    r
}

/// What kube-proxy's partial sync restores when one endpoint of service
/// `i` goes: that service's chains, rewritten (`--noflush`).
fn one_service_update(i: usize, pods: &[(String, Ipv4Addr)]) -> String {
    let mut r = format!("*nat\n:KUBE-SVC-{i} - [0:0]\n:KUBE-EXT-{i} - [0:0]\n");
    for j in 0..pods.len() {
        let _ = writeln!(r, ":KUBE-SEP-{i}-{j} - [0:0]");
    }
    service_chains(&mut r, i, pods);
    r.push_str("COMMIT\n");
    r
}

/// What one (datapath, N) case measured; `None`: not applicable.
#[derive(Default)]
struct Measured {
    /// From nothing to all N services programmed: iptables-restore of
    /// the rules, or the agent's start until its first sync is done.
    program: Option<Duration>,
    agent_rss_kib: Option<u64>,
    map_memory_kib: Option<u64>,
    conns: Option<Load>,
    stream_gbit: Option<f64>,
    pps: Option<Pps>,
    /// lb_ingress and lb_xdp, new flows and established: ns per packet.
    cost: Option<[f64; 4]>,
    /// One endpoint change → applied.
    change: Option<Change>,
}

/// One endpoint change → applied, over `ENDPOINT_CHANGES` changes.
struct Change {
    p50: Duration,
    p99: Duration,
    /// CPU time (user + system) spent per change: the agent's for ours,
    /// iptables-restore's for kube-proxy's partial sync.
    cpu: Duration,
}

/// What the clients saw.
struct Load {
    conns_per_sec: f64,
    p50: Duration,
    p99: Duration,
    failed: usize,
}

struct Pps {
    received: f64,
    sent: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// `CLIENTS` threads in the client namespace opening a connection, one
/// request, closing — for `duration`.
fn load(sandbox: &Sandbox, target: SocketAddr, duration: Duration) -> anyhow::Result<Load> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let stop = stop.clone();
            sandbox.client().spawn(move || {
                let (mut lat, mut failed) = (Vec::new(), 0usize);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match lb_tests::client::http_get(target) {
                        Ok(_) => lat.push(t.elapsed()),
                        Err(_) => failed += 1,
                    }
                }
                (lat, failed)
            })
        })
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut failed) = (Vec::new(), 0);
    for w in workers {
        let (lat, f) = w.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        all.extend(lat);
        failed += f;
    }
    let elapsed = started.elapsed();
    all.sort();
    Ok(Load {
        conns_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        failed,
    })
}

fn release_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name)
}

/// The MAC address of `ifname` in `ns`.
fn mac_of(ns: &lb_tests::netns::Netns, ifname: &str) -> anyhow::Result<String> {
    let out = lb_tests::netns::run(Command::new("ip").args(["-n", &ns.name, "-j", "link", "show", ifname]))?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    links[0]["address"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("no MAC for {ifname} in {}", ns.name))
}

fn json_of(out: std::process::Output) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// UDP new-flow packets per second from the client to `to` (dst MAC: the
/// node's client-side veth), counted at the pods.
fn udp_pps(sandbox: &Sandbox, to: SocketAddr, ceiling: bool, seconds: f64) -> anyhow::Result<Pps> {
    let node_if = sandbox.client_host_if();
    let client = &sandbox.clients[0];
    let mut cmd = Command::new(release_bin("lb-bench"));
    cmd.args(["pps", "--from"])
        .arg(format!("{}:1024", client.ip))
        .arg("--to")
        .arg(to.to_string())
        .arg("--src-mac")
        .arg(mac_of(&client.ns, "eth0")?)
        .arg("--dst-mac")
        .arg(mac_of(&sandbox.node, &node_if)?)
        .arg("--client-netns")
        .arg(client.ns.path())
        .args(["--client-if", "eth0", "--seconds", &seconds.to_string()]);
    for p in &sandbox.pods {
        cmd.arg("--sink").arg(format!("{}:eth0", p.ns.path()));
    }
    if ceiling {
        let pod = &sandbox.pods[0];
        cmd.arg("--ceiling").arg(format!(
            "{}:{node_if}:veth0:{}:{}",
            sandbox.node.path(),
            mac_of(&pod.ns, "eth0")?,
            mac_of(&sandbox.node, "veth0")?
        ));
    }
    let v = json_of(lb_tests::netns::run(&mut cmd)?)?;
    Ok(Pps {
        received: v["received_pps"].as_f64().unwrap_or(0.0),
        sent: v["sent_pps"].as_f64().unwrap_or(0.0),
    })
}

/// ns/packet of lb_ingress and lb_xdp on the agent's maps: new flows, then
/// one established flow.
fn program_cost(sandbox: &Sandbox, udp_port: u16) -> anyhow::Result<[f64; 4]> {
    let mut out = [0.0; 4];
    let node_if = sandbox.client_host_if();
    let runs = [(false, true), (false, false), (true, true), (true, false)];
    for (k, (xdp, new_flows)) in runs.into_iter().enumerate() {
        let mut cmd = sandbox.node.command(release_bin("lb-bench").to_str().context("path")?);
        // A source of its own per run, so "new" flows are new.
        cmd.args(["cost", "--from"])
            .arg(format!("198.18.3.{}:1024", k + 1))
            .arg("--to")
            .arg(format!("{NODE_GATEWAY}:{udp_port}"))
            .args(["--src-mac", "02:00:00:00:00:01", "--dst-mac", "02:00:00:00:00:02"])
            .arg("--bpf-root")
            .arg(&sandbox.bpf_root)
            .args(["--ingress-if", &node_if]);
        if xdp {
            cmd.arg("--xdp");
        }
        if new_flows {
            cmd.arg("--new-flows");
        }
        out[k] = json_of(lb_tests::netns::run(&mut cmd)?)?["ns_per_packet"]
            .as_f64()
            .unwrap_or(0.0);
    }
    Ok(out)
}

/// One TCP download through `target`, in Gbit/s.
fn stream(sandbox: &Sandbox, target: SocketAddr) -> anyhow::Result<f64> {
    let (bytes, took) = sandbox
        .client()
        .run(move || lb_tests::client::bulk_get(target, STREAM_MIB))??;
    Ok(bytes as f64 * 8.0 / took.as_secs_f64() / 1e9)
}

/// Sum of the memory the kernel charges for the maps pinned under `root`.
fn map_memory_kib(root: &Path) -> Option<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        if !entry.file_type().ok()?.is_file() {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(entry.path())
            .output()
            .ok()?;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            total += v["bytes_memlock"].as_u64().unwrap_or(0);
        }
    }
    Some(total / 1024)
}

/// One endpoint of the last TCP service removed and restored, over and
/// over: manifest write → the agent logs the sync that applied it.
fn endpoint_changes(sandbox: &Sandbox, agent: &Agent, n: usize, pods: &[(String, Ipv4Addr)]) -> anyhow::Result<Change> {
    let service = |pods: &[(String, Ipv4Addr)]| {
        let def = ServiceDef {
            name: "changing",
            cluster_ip: vip(n + 1),
            ..nginx_service(pods)
        };
        typed_service(&def, "NodePort", Some(last_node_port(n + 1, n)))
    };
    sandbox.write_manifest("changing.yaml", &service(pods))?;
    agent.wait_manifest_synced(0, Duration::from_secs(30))?;
    let mut took = Vec::new();
    let cpu_before = process_cpu(agent.pid());
    for k in 0..ENDPOINT_CHANGES {
        let endpoints = if k % 2 == 0 { &pods[..pods.len() - 1] } else { pods };
        let from = agent.log_position();
        sandbox.write_manifest("changing.yaml", &service(endpoints))?;
        took.push(agent.wait_manifest_synced(from, Duration::from_secs(30))?);
    }
    let cpu = process_cpu(agent.pid()).saturating_sub(cpu_before);
    Ok(change(took, cpu))
}

fn change(mut took: Vec<Duration>, cpu: Duration) -> Change {
    took.sort();
    Change {
        p50: percentile(&took, 0.5),
        p99: percentile(&took, 0.99),
        cpu: cpu / ENDPOINT_CHANGES as u32,
    }
}

/// User + system CPU time of a process so far (/proc/PID/stat).
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// CPU time used by this process's waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage into a struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The same change for kube-proxy: a partial iptables-restore of one
/// service's chains, `ENDPOINT_CHANGES` times.
fn iptables_changes(sandbox: &Sandbox, tool: &str, n: usize, pods: &[(String, Ipv4Addr)]) -> anyhow::Result<Change> {
    let mut took = Vec::new();
    let cpu_before = children_cpu();
    for k in 0..ENDPOINT_CHANGES {
        let endpoints = if k % 2 == 0 { &pods[..pods.len() - 1] } else { pods };
        let t = Instant::now();
        sandbox
            .node
            .iptables_restore(tool, &["--noflush"], &one_service_update(n - 1, endpoints))?;
        took.push(t.elapsed());
    }
    Ok(change(took, children_cpu().saturating_sub(cpu_before)))
}

fn run_case(dp: Datapath, n: usize, seconds: f64) -> anyhow::Result<Measured> {
    let pods = example_pods();
    let names: Vec<&str> = pods.iter().map(|(n, _)| n.as_str()).collect();
    let sandbox = Sandbox::new("lbbench-", &names)?;
    // Every datapath gets the same wires (see Sandbox::wire_for_xdp).
    sandbox.wire_for_xdp()?;
    let pod0 = pods[0].1;
    // The last service: kube-proxy's KUBE-SERVICES walk is longest for it.
    let (tcp_target, udp_target) = match dp {
        Datapath::Plain | Datapath::Ceiling => (SocketAddr::from((pod0, 80)), SocketAddr::from((pod0, UDP_PORT))),
        _ => (
            SocketAddr::from((NODE_GATEWAY, last_node_port(n - 1, n))),
            SocketAddr::from((NODE_GATEWAY, last_node_port(n, n))),
        ),
    };
    let mut m = Measured::default();
    let programming = Instant::now();
    let agent = match dp {
        Datapath::Tc | Datapath::Xdp => {
            sandbox.write_manifest("services.yaml", &manifests(n, &pods))?;
            // Changes applied as they come (no rate limit, no debounce): the
            // endpoint-change latency is the datapath's, not a setting's.
            // Room for every frontend (cluster IP, NodePorts per node
            // address, address markers) and backend (3 pods each).
            // (The agent's defaults, 65,536 and 262,144, hold 10,000 services.)
            let max_services = (4 * n).max(65_536);
            let max_backends = (12 * n).max(262_144);
            let mut args: Vec<std::ffi::OsString> = vec![
                "--manifests".into(),
                sandbox.manifests_dir.clone().into(),
                "--min-sync-period".into(),
                "0s".into(),
                "--manifests-debounce".into(),
                "0s".into(),
                "--max-services".into(),
                max_services.to_string().into(),
                "--max-backends".into(),
                max_backends.to_string().into(),
            ];
            if dp == Datapath::Xdp {
                for a in ["--xdp-mode", "native", "--xdp-interfaces"] {
                    args.push(a.into());
                }
                args.push(sandbox.client_host_if().into());
                args.push("--xdp-redirect-interfaces".into());
                args.push("veth*".into());
            }
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            Some(Agent::start_with(&sandbox, &args, false)?)
        }
        Datapath::IptablesNft | Datapath::IptablesLegacy => {
            let tool = if dp == Datapath::IptablesNft {
                "iptables-nft-restore"
            } else {
                "iptables-legacy-restore"
            };
            sandbox.node.iptables_restore(tool, &[], &iptables_rules(n, &pods))?;
            None
        }
        Datapath::Plain | Datapath::Ceiling => None,
    };
    if dp != Datapath::Plain && dp != Datapath::Ceiling {
        m.program = Some(programming.elapsed());
    }
    if let Some(a) = &agent {
        m.agent_rss_kib = rss_kib(a.pid());
        m.map_memory_kib = map_memory_kib(&sandbox.bpf_root);
    }
    if dp != Datapath::Ceiling {
        // Warm up (ARP, first connections), then measure.
        load(&sandbox, tcp_target, Duration::from_millis(300))?;
        m.conns = Some(load(&sandbox, tcp_target, Duration::from_secs_f64(seconds))?);
        m.stream_gbit = Some(stream(&sandbox, tcp_target)?);
    }
    if dp == Datapath::Xdp {
        m.cost = Some(program_cost(&sandbox, last_node_port(n, n))?);
    }
    // At every N: the cost of one change is what must not grow with the cluster.
    m.change = match (dp, &agent) {
        (Datapath::Tc, Some(a)) => Some(endpoint_changes(&sandbox, a, n, &pods)?),
        (Datapath::IptablesNft, _) => Some(iptables_changes(&sandbox, "iptables-nft-restore", n, &pods)?),
        (Datapath::IptablesLegacy, _) => Some(iptables_changes(&sandbox, "iptables-legacy-restore", n, &pods)?),
        _ => None,
    };
    // Last: the sinks it attaches drop everything the pods receive.
    let pps = match udp_pps(&sandbox, udp_target, dp == Datapath::Ceiling, seconds) {
        Ok(pps) => pps,
        Err(e) => {
            // The live-frame generator needs BPF_F_TEST_XDP_LIVE_FRAMES,
            // which some kernels refuse: the section is reported missing,
            // the rest of the run goes on.
            eprintln!("    UDP pps skipped: {:#}", e.root_cause());
            return Ok(m);
        }
    };
    if pps.received < pps.sent / 2.0 {
        eprintln!(
            "    note: {} of {} packets/s arrived{}",
            pps.received as u64,
            pps.sent as u64,
            match &agent {
                Some(_) => format!(
                    "; the agent counted:\n{}",
                    lb_tests::netns::run(
                        Command::new(release_bin("lb-agent"))
                            .args(["stats", "--bpf-root"])
                            .arg(&sandbox.bpf_root)
                    )
                    .map(|o| String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| !l.contains("service") && !l.contains("backend") && !l.contains(" 0 "))
                        .collect::<Vec<_>>()
                        .join("\n"))
                    .unwrap_or_default()
                ),
                None => String::new(),
            }
        );
    }
    m.pps = Some(pps);
    Ok(m)
}

/// VmRSS of a process, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn or_dash<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or("-".to_string(), f)
}

/// a ÷ b as "1.23x", or "-".
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

pub fn run(services: &[usize], seconds: u64, only: &[String]) -> anyhow::Result<()> {
    if let Some(&n) = services.iter().find(|&&n| n == 0 || n > MAX_SERVICES) {
        bail!("--services {n}: choose 1..={MAX_SERVICES}");
    }
    if let Some(bad) = only.iter().find(|o| !ALL.iter().any(|d| d.key() == o.as_str())) {
        bail!("--only {bad}: choose from plain, ceiling, nft, legacy, tc, xdp");
    }
    let datapaths: Vec<Datapath> = ALL
        .into_iter()
        .filter(|d| only.is_empty() || only.iter().any(|o| o == d.key()))
        .collect();
    crate::setup::require_root("the benchmark loads eBPF programs and creates network namespaces")?;
    crate::setup::run()?;
    step("building lb-agent and lb-bench --release (what the benchmark measures)");
    crate::cmd("cargo", &["build", "--release", "--package", "lb-agent"])?;
    // SAFETY: set before any thread of the benchmark (or its interrupt
    // handler) starts; the agent processes it spawns read it.
    unsafe { std::env::set_var("LB_AGENT_BIN", release_bin("lb-agent")) };
    cleanup::on_interrupt();
    cleanup::sweep_stale("lbbench-");
    let largest = services.iter().copied().max().unwrap_or(1);
    let mut results: Vec<(usize, Datapath, Measured)> = Vec::new();
    for &n in services {
        for &dp in &datapaths {
            step(&format!(
                "{n} services, {}: program, then measure ({seconds} s loads)",
                dp.name()
            ));
            let m = run_case(dp, n, seconds as f64).with_context(|| format!("{} with {n} services", dp.name()))?;
            results.push((n, dp, m));
        }
    }
    let report = report(&results, largest);
    println!("\n{report}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latest.md"), &report)?;
    crate::plot::write_svg(&dir.join("latest.svg"), &plot_series(&results))?;
    step(&format!(
        "written to {} and latest.svg",
        dir.join("latest.md").display()
    ));
    Ok(())
}

fn plot_series(results: &[(usize, Datapath, Measured)]) -> crate::plot::Charts {
    let mut conns: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut pps: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for dp in ALL {
        let of = |f: &dyn Fn(&Measured) -> Option<f64>| -> Vec<(f64, f64)> {
            results
                .iter()
                .filter(|(_, d, _)| *d == dp)
                .filter_map(|(n, _, m)| f(m).map(|v| (*n as f64, v)))
                .collect()
        };
        let c = of(&|m| m.conns.as_ref().map(|l| l.conns_per_sec));
        if !c.is_empty() {
            conns.push((dp.name().to_string(), c));
        }
        let p = of(&|m| m.pps.as_ref().map(|p| p.received));
        if !p.is_empty() {
            pps.push((dp.name().to_string(), p));
        }
    }
    crate::plot::Charts {
        left: ("new TCP conns/s through the NodePort", conns),
        right: ("UDP packets/s, a new flow each", pps),
    }
}

fn report(results: &[(usize, Datapath, Measured)], largest: usize) -> String {
    let get = |n: usize, dp: Datapath| results.iter().find(|(m, d, _)| *m == n && *d == dp).map(|(_, _, m)| m);
    let conns = |n: usize, dp: Datapath| get(n, dp).and_then(|m| m.conns.as_ref().map(|l| l.conns_per_sec));
    let pps = |n: usize, dp: Datapath| get(n, dp).and_then(|m| m.pps.as_ref().map(|p| p.received));
    let first_n = results.first().map_or(1, |r| r.0);
    let mut t = String::from(
        "| services | datapath | programmed in | agent RSS | BPF maps | new conns/s | p50 | p99 | failed | 1 stream | UDP new-flow pps (sent) | conns vs nft | conns vs legacy | conns vs own at first N |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, dp, m) in results {
        let c = m.conns.as_ref();
        let _ = writeln!(
            t,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            dp.name(),
            or_dash(m.program, ms),
            or_dash(m.agent_rss_kib, |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            or_dash(m.map_memory_kib, |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            or_dash(c, |l| format!("{:.0}", l.conns_per_sec)),
            or_dash(c, |l| ms(l.p50)),
            or_dash(c, |l| ms(l.p99)),
            or_dash(c, |l| l.failed.to_string()),
            or_dash(m.stream_gbit, |g| format!("{g:.2} Gbit/s")),
            or_dash(m.pps.as_ref(), |p| format!("{:.0} ({:.0})", p.received, p.sent)),
            ratio(c.map(|l| l.conns_per_sec), conns(*n, Datapath::IptablesNft)),
            ratio(c.map(|l| l.conns_per_sec), conns(*n, Datapath::IptablesLegacy)),
            ratio(c.map(|l| l.conns_per_sec), conns(first_n, *dp)),
        );
    }
    let mut r = String::from(
        "| services | XDP ÷ bare XDP redirect (pps) | TC ÷ plain forwarding (pps) | XDP ÷ TC (pps) | XDP ÷ iptables-legacy (pps) | XDP ÷ iptables-nft (pps) | TC ÷ iptables-legacy (pps) | ours (TC) ÷ iptables-legacy (conns) | ours (TC) ÷ iptables-nft (conns) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ns: std::collections::BTreeSet<usize> = results.iter().map(|r| r.0).collect();
    for &n in &ns {
        let _ = writeln!(
            r,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ratio(pps(n, Datapath::Xdp), pps(n, Datapath::Ceiling)),
            ratio(pps(n, Datapath::Tc), pps(n, Datapath::Plain)),
            ratio(pps(n, Datapath::Xdp), pps(n, Datapath::Tc)),
            ratio(pps(n, Datapath::Xdp), pps(n, Datapath::IptablesLegacy)),
            ratio(pps(n, Datapath::Xdp), pps(n, Datapath::IptablesNft)),
            ratio(pps(n, Datapath::Tc), pps(n, Datapath::IptablesLegacy)),
            ratio(conns(n, Datapath::Tc), conns(n, Datapath::IptablesLegacy)),
            ratio(conns(n, Datapath::Tc), conns(n, Datapath::IptablesNft)),
        );
    }
    let mut c = String::from(
        "| services | lb_ingress (TC), new flow | lb_ingress, established | lb_xdp, new flow | lb_xdp, established |\n|---:|---:|---:|---:|---:|\n",
    );
    for &n in &ns {
        if let Some(cost) = get(n, Datapath::Xdp).and_then(|m| m.cost) {
            let _ = writeln!(
                c,
                "| {n} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns |",
                cost[0], cost[1], cost[2], cost[3]
            );
        }
    }
    let mut e = String::from("| services | datapath | p50 | p99 | CPU per change |\n|---:|---|---:|---:|---:|\n");
    for &n in &ns {
        for dp in [Datapath::Tc, Datapath::IptablesNft, Datapath::IptablesLegacy] {
            if let Some(c) = get(n, dp).and_then(|m| m.change.as_ref()) {
                let _ = writeln!(
                    e,
                    "| {n} | {} | {} | {} | {} |",
                    dp.name(),
                    ms(c.p50),
                    ms(c.p99),
                    ms(c.cpu)
                );
            }
        }
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let own_ratio = ratio(conns(largest, Datapath::Tc), conns(first_n, Datapath::Tc));
    format!(
        "# cargo xtask bench\n\n\
One run, one machine ({} cores, kernel {}); client, node and pods are network\n\
namespaces on it, so the load generators share the CPUs with the datapath:\n\
the ratios are what this run measured, not absolute capacities. Plot: latest.svg.\n\n\
## Per datapath\n\nNew TCP connections: 32 clients to the last service's NodePort (masqueraded),\n\
one request each, client closes first. 1 stream: one {STREAM_MIB} MiB download. UDP: an XDP\n\
live-frame generator in the client namespace, every packet a new flow (source port,\n\
then address), to a NodePort with externalTrafficPolicy Local; counted where they\n\
reach the pods (received, and sent by the generator). Plain forwarding and the\n\
ceiling target a pod directly.\n\n{t}\n\
## Ratios\n\n{r}\n\
Ours (TC) at {largest} services ÷ ours at {first_n}: {own_ratio} (new conns/s).\n\n\
## Program cost (BPF_PROG_TEST_RUN, per packet, UDP to the NodePort)\n\n{c}\n\
## One endpoint change\n\n\
Ours: manifest write → the agent logs the sync that applied it ({ENDPOINT_CHANGES} changes);\n\
CPU: the agent's user + system time per change (its manifests source reads only the\n\
changed file). iptables: kube-proxy's partial sync, `iptables-restore --noflush` of the\n\
service's chains; CPU: iptables-restore's.\n\n{e}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}
