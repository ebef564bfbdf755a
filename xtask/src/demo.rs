//! `cargo xtask demo`: the seed's example balanced by eBPF in a sandbox.

use std::net::SocketAddr;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use lb_tests::client::{http_get, tally, udp_query};
use lb_tests::manifests::{NGINX_VIP, NODE_PORT, UDP_VIP, example_pods};
use lb_tests::sandbox::NODE_GATEWAY;
use lb_tests::{Agent, Sandbox, cleanup, netns};

use crate::step;

const REQUESTS: usize = 300;
const UDP_QUERIES: usize = 60;

pub fn run() -> anyhow::Result<()> {
    crate::setup::require_root("the demo loads eBPF programs and creates network namespaces")?;
    cleanup::on_interrupt();
    cleanup::sweep_stale("lbdemo-");

    let pods = example_pods();
    let names: Vec<&str> = pods.iter().map(|(n, _)| n.as_str()).collect();
    step("creating the sandbox: namespaces node-1, 3 nginx pods, 1 client (198.18.0.0/15 only)");
    let sandbox = Sandbox::new("lbdemo-", &names)?;
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/net-test.yaml"))
        .context("reading deploy/examples/net-test.yaml")?;
    sandbox.write_manifest("net-test.yaml", &example)?;

    // The client's veth plays the node's external interface: XDP (native)
    // there, redirecting to the pods' veths (whose peers take XDP frames).
    sandbox.wire_for_xdp()?;
    let external = sandbox.client_host_if();
    step(&format!(
        "starting lb-agent in the node namespace on deploy/examples/net-test.yaml (TC on every interface, XDP on {external})"
    ));
    let args: Vec<std::ffi::OsString> = vec![
        "--manifests".into(),
        sandbox.manifests_dir.clone().into(),
        "--xdp-mode".into(),
        "native".into(),
        "--xdp-interfaces".into(),
        external.into(),
        "--xdp-redirect-interfaces".into(),
        "veth*".into(),
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let agent = Agent::start_with(&sandbox, &args, false)?;

    let http = SocketAddr::from((NGINX_VIP, 8080));
    step(&format!(
        "client 198.18.2.10: {REQUESTS} HTTP requests to ClusterIP {http} (nginx-service)"
    ));
    let tcp_counts = tally(sandbox.client(), REQUESTS, http, http_get)?;

    let udp = SocketAddr::from((UDP_VIP, 53));
    step(&format!(
        "client 198.18.2.10: {UDP_QUERIES} UDP queries to ClusterIP {udp} (udp-echo)"
    ));
    let udp_counts = tally(sandbox.client(), UDP_QUERIES, udp, udp_query)?;

    let node_port = SocketAddr::from((NODE_GATEWAY, NODE_PORT));
    step(&format!(
        "client 198.18.2.10: {REQUESTS} HTTP requests to NodePort {node_port} (nginx-service-nodeport, masqueraded)"
    ));
    let np_counts = tally(sandbox.client(), REQUESTS, node_port, http_get)?;

    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "pod",
        "pod IP",
        &format!("HTTP via {http}"),
        "share",
        &format!("UDP via {udp}"),
        &format!("HTTP via NodePort {node_port}"),
    ]);
    for (name, ip) in &pods {
        let n = tcp_counts.get(name).copied().unwrap_or(0);
        table.add_row(vec![
            name.clone(),
            ip.to_string(),
            n.to_string(),
            format!("{:.1}%", 100.0 * n as f64 / REQUESTS as f64),
            udp_counts.get(name).copied().unwrap_or(0).to_string(),
            np_counts.get(name).copied().unwrap_or(0).to_string(),
        ]);
    }
    println!("\n{table}\n");

    let rules = sandbox.nat_rules()?;
    println!(
        "iptables/nft NAT rules in the node namespace: {}",
        if rules.is_empty() {
            "none (all translation done by eBPF)".to_string()
        } else {
            rules
        }
    );
    // What the kernel maps hold (also: `bpftool map dump pinned <root>/SERVICES`).
    let root = sandbox.bpf_root.display().to_string();
    for args in [["services", "--bpf-root", &root], ["stats", "--bpf-root", &root]] {
        let out = netns::run(std::process::Command::new(lb_tests::agent::agent_bin()).args(args))?;
        println!(
            "\nlb-agent {}:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
    }

    step("stopping the agent and removing the sandbox");
    agent.stop()?;
    drop(sandbox);
    Ok(())
}
