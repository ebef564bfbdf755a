//! `cargo xtask bench`: this datapath against kube-proxy's, side by side in
//! one run, on the same netns topology (client → node → 3 pods): new TCP
//! connections per second through a NodePort (masqueraded, as kube-proxy
//! does with externalTrafficPolicy Cluster), with 32 concurrent clients,
//! and their latency, for N services. kube-proxy's datapath is rebuilt as
//! its iptables rules (KUBE-SERVICES / KUBE-NODEPORTS / KUBE-SVC / KUBE-SEP /
//! KUBE-MARK-MASQ / KUBE-POSTROUTING) with iptables-nft and iptables-legacy.
//! Writes the table to bench/results/latest.md.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lb_tests::manifests::{ServiceDef, example_pods, nginx_service, typed_service};
use lb_tests::sandbox::NODE_GATEWAY;
use lb_tests::{Agent, Sandbox, cleanup};

use crate::step;

const CLIENTS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Datapath {
    Ebpf,
    IptablesNft,
    IptablesLegacy,
}

impl Datapath {
    fn name(self) -> &'static str {
        match self {
            Datapath::Ebpf => "lb (eBPF, TC)",
            Datapath::IptablesNft => "kube-proxy rules, iptables-nft",
            Datapath::IptablesLegacy => "kube-proxy rules, iptables-legacy",
        }
    }
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Services the benchmark can create: each has its own NodePort, from
/// 30000 up (a widened --service-node-port-range, as large clusters use).
const MAX_SERVICES: usize = 20_000;

fn node_port(i: usize) -> u16 {
    30000 + i as u16
}

/// N NodePort services on the three pods, as manifests for the agent.
fn manifests(n: usize) -> String {
    let pods = example_pods();
    let docs: Vec<String> = (0..n)
        .map(|i| {
            // The seed's nginx service (TCP 8080 → 80), renamed and readdressed.
            let def = ServiceDef {
                name: Box::leak(format!("svc-{i}").into_boxed_str()),
                cluster_ip: vip(i),
                ..nginx_service(&pods)
            };
            typed_service(&def, "NodePort", Some(node_port(i)))
        })
        .collect();
    lb_tests::manifests::join(&docs)
}

/// kube-proxy's iptables-mode rules for the same N services.
fn iptables_rules(n: usize) -> String {
    let pods = example_pods();
    let mut r = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for i in 0..n {
        let _ = writeln!(r, ":KUBE-SVC-{i} - [0:0]\n:KUBE-EXT-{i} - [0:0]");
        for j in 0..pods.len() {
            let _ = writeln!(r, ":KUBE-SEP-{i}-{j} - [0:0]");
        }
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
        let _ = writeln!(
            r,
            "-A KUBE-NODEPORTS -p tcp -m tcp --dport {} -j KUBE-EXT-{i}",
            node_port(i)
        );
        let _ = writeln!(r, "-A KUBE-EXT-{i} -j KUBE-MARK-MASQ\n-A KUBE-EXT-{i} -j KUBE-SVC-{i}");
        let k = pods.len();
        for (j, (_, ip)) in pods.iter().enumerate() {
            let left = k - j;
            if left > 1 {
                let _ = writeln!(
                    r,
                    "-A KUBE-SVC-{i} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}-{j}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(r, "-A KUBE-SVC-{i} -j KUBE-SEP-{i}-{j}");
            }
            let _ = writeln!(r, "-A KUBE-SEP-{i}-{j} -p tcp -m tcp -j DNAT --to-destination {ip}:80");
        }
    }
    r.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");
    r
}

fn iptables_restore(sandbox: &Sandbox, tool: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = sandbox
        .node
        .command(tool)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{tool}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

struct Measured {
    /// From nothing to all N services programmed: iptables-restore of
    /// the rules, or the agent's start until its first sync is done.
    program: Duration,
    /// The agent's resident memory with N services (eBPF only).
    agent_rss_kib: Option<u64>,
    load: Load,
}

/// What the clients saw.
struct Load {
    conns_per_sec: f64,
    p50: Duration,
    p99: Duration,
    failed: usize,
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
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Load {
        conns_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
        failed,
    })
}

fn run_case(datapath: Datapath, n: usize, duration: Duration) -> anyhow::Result<Measured> {
    let pods = example_pods();
    let names: Vec<&str> = pods.iter().map(|(n, _)| n.as_str()).collect();
    let sandbox = Sandbox::new("lbbench-", &names)?;
    // The last service: kube-proxy's KUBE-SERVICES walk is longest for it.
    let target = SocketAddr::from((NODE_GATEWAY, node_port(n - 1)));
    let programming = Instant::now();
    let agent = match datapath {
        Datapath::Ebpf => {
            sandbox.write_manifest("services.yaml", &manifests(n))?;
            Some(Agent::start(&sandbox, false)?)
        }
        Datapath::IptablesNft => {
            iptables_restore(&sandbox, "iptables-nft-restore", &iptables_rules(n))?;
            None
        }
        Datapath::IptablesLegacy => {
            iptables_restore(&sandbox, "iptables-legacy-restore", &iptables_rules(n))?;
            None
        }
    };
    let program = programming.elapsed();
    // Warm up (ARP, first connections), then measure.
    load(&sandbox, target, Duration::from_millis(300))?;
    let load = load(&sandbox, target, duration)?;
    Ok(Measured {
        program,
        agent_rss_kib: agent.as_ref().and_then(|a| rss_kib(a.pid())),
        load,
    })
}

/// VmRSS of a process, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn run(services: &[usize], seconds: u64) -> anyhow::Result<()> {
    if let Some(&n) = services.iter().find(|&&n| n == 0 || n > MAX_SERVICES) {
        bail!("--services {n}: choose 1..={MAX_SERVICES} (one NodePort each, from 30000 up)");
    }
    crate::setup::require_root("the benchmark loads eBPF programs and creates network namespaces")?;
    crate::setup::run()?;
    step("building lb-agent --release (what the benchmark measures)");
    crate::cmd("cargo", &["build", "--release", "--package", "lb-agent"])?;
    let release_agent = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb-agent");
    // SAFETY: set before any thread of the benchmark (or its interrupt
    // handler) starts; the agent processes it spawns read it.
    unsafe { std::env::set_var("LB_AGENT_BIN", &release_agent) };
    cleanup::on_interrupt();
    cleanup::sweep_stale("lbbench-");
    let duration = Duration::from_secs(seconds);
    let mut table = String::from(
        "| services | datapath | programmed in | agent RSS | new conns/s (NodePort, masqueraded, 32 clients) | p50 | p99 | failed | vs kube-proxy nft | vs kube-proxy legacy | vs own at 1st N |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut first_n_rate = std::collections::HashMap::new();
    for &n in services {
        let mut cases = Vec::new();
        for dp in [Datapath::IptablesNft, Datapath::IptablesLegacy, Datapath::Ebpf] {
            step(&format!(
                "{n} services, {}: program, then {seconds} s of load",
                dp.name()
            ));
            let m = run_case(dp, n, duration).with_context(|| format!("{} with {n} services", dp.name()))?;
            cases.push((dp, m));
        }
        let rates: std::collections::HashMap<Datapath, f64> =
            cases.iter().map(|(dp, m)| (*dp, m.load.conns_per_sec)).collect();
        for (
            dp,
            Measured {
                program,
                agent_rss_kib,
                load: m,
            },
        ) in cases
        {
            let first = *first_n_rate.entry(dp).or_insert(m.conns_per_sec);
            let ratio = |base: Option<&f64>| base.map_or("-".to_string(), |r| format!("{:.2}x", m.conns_per_sec / r));
            let _ = writeln!(
                table,
                "| {n} | {} | {:.0} ms | {} | {:.0} | {:.2} ms | {:.2} ms | {} | {} | {} | {:.2}x |",
                dp.name(),
                program.as_secs_f64() * 1000.0,
                agent_rss_kib.map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                m.conns_per_sec,
                m.p50.as_secs_f64() * 1000.0,
                m.p99.as_secs_f64() * 1000.0,
                m.failed,
                ratio(rates.get(&Datapath::IptablesNft)),
                ratio(rates.get(&Datapath::IptablesLegacy)),
                m.conns_per_sec / first,
            );
        }
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let report = format!(
        "# cargo xtask bench\n\nOne run, one machine ({} cores, kernel {}); client, node and pods are network\nnamespaces on it, so the load generator shares the CPUs with the datapath:\nthe ratios are what this run measured, not absolute capacities.\n\n{table}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
    println!("\n{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latest.md"), &report)?;
    step(&format!("written to {}", dir.join("latest.md").display()));
    Ok(())
}
