//! End-to-end: real TCP/UDP through veths of a netns node running lb-agent.
//! Each test builds its own sandbox (namespaces, pins, agent) and removes it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lb_tests::client::{KeepAlive, http_get, tally, udp_query};
use lb_tests::manifests::{self, NGINX_VIP, PortDef, ServiceDef, UDP_VIP, example_pods, nginx_service, udp_service};
use lb_tests::{Agent, Sandbox};

const PODS: [&str; 3] = ["nginx-a", "nginx-b", "nginx-c"];

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A sandbox with the example's pods, the example manifests and a ready agent.
fn example_sandbox() -> (Sandbox, Agent) {
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    let agent = Agent::start(&sandbox, true).expect("agent");
    (sandbox, agent)
}

/// `n` requests on fresh connections from the client; pod name → count.
fn spread(sandbox: &Sandbox, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    tally(sandbox.client(), n, target, http_get).expect("requests through the service")
}

/// One request from the client.
fn get(sandbox: &Sandbox, target: SocketAddr) -> anyhow::Result<String> {
    sandbox.client().run(move || http_get(target)).unwrap()
}

/// Rewrites the manifests and waits until the agent has synced them.
fn apply(sandbox: &Sandbox, agent: &Agent, file: &str, yaml: &str) -> Duration {
    let from = agent.log_position();
    let started = Instant::now();
    sandbox.write_manifest(file, yaml).unwrap();
    agent
        .wait_manifest_synced(from, Duration::from_secs(5))
        .expect("agent sync");
    started.elapsed()
}

#[test]
fn clusterip_balances_300_requests_over_all_pods_without_nat_rules() {
    let (sandbox, _agent) = example_sandbox();
    let counts = spread(&sandbox, addr(NGINX_VIP, 8080), 300);
    assert_eq!(counts.keys().cloned().collect::<Vec<_>>(), PODS, "{counts:?}");
    for (pod, n) in &counts {
        assert!(*n >= 45, "{pod} answered {n} of 300 (< 15%): {counts:?}");
    }
    let rules = sandbox
        .nat_rules()
        .expect("listing nat rules (is nftables/iptables installed? run cargo xtask setup)");
    assert!(
        rules.is_empty(),
        "the node has NAT rules; only eBPF may translate:\n{rules}"
    );

    // BTF makes bpftool print the maps by field name.
    let dump = lb_tests::netns::run(
        std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(sandbox.bpf_root.join("SERVICES")),
    )
    .expect("bpftool map dump");
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in ["\"service_id\"", "\"backend_count\"", "\"port\": 8080"] {
        assert!(dump.contains(field), "bpftool output lacks {field}:\n{dump}");
    }
}

#[test]
fn stopped_agent_leaves_the_datapath_serving_and_cleanup_removes_it() {
    let (sandbox, agent) = example_sandbox();
    assert!(get(&sandbox, addr(NGINX_VIP, 8080)).is_ok());
    let status = agent.stop().unwrap();
    assert!(status.success(), "agent exit status {status}");
    // Like kube-proxy's rules, the datapath outlives the agent (pinned).
    assert_eq!(spread(&sandbox, addr(NGINX_VIP, 8080), 30).values().sum::<usize>(), 30);

    let out = std::process::Command::new(lb_tests::agent::agent_bin())
        .args(["cleanup", "--bpf-root"])
        .arg(&sandbox.bpf_root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !sandbox.bpf_root.exists(),
        "pins left under {}",
        sandbox.bpf_root.display()
    );
    // Still-attached programs would keep translating from their maps. The
    // kernel releases an unpinned link asynchronously (deferred put), with
    // no event to wait on: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(2);
    let via_vip = loop {
        let r = get(&sandbox, addr(NGINX_VIP, 8080));
        if r.is_err() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(via_vip.is_err(), "the VIP still answers after cleanup: {via_vip:?}");
    let pod_a = sandbox.pod("nginx-a").ip;
    assert_eq!(get(&sandbox, addr(pod_a, 80)).unwrap(), "nginx-a");
}

/// How an agent restart is done: extra flags and environment.
#[derive(Clone, Copy)]
struct Restart<'a> {
    args: &'a [&'a str],
    envs: &'a [(&'a str, &'a str)],
}

/// Restarts the agent of the example sandbox once per `restarts` while 32
/// clients (half through the ClusterIP, half through the masqueraded
/// NodePort) make short connections and four long-lived ones stay open;
/// `check` looks at each new agent. No connection may fail, and each
/// long-lived one keeps its pod.
fn restarts_under_load(restarts: &[Restart], check: impl Fn(usize, &Sandbox, &Agent)) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (sandbox, agent) = example_sandbox();
    // Through the ClusterIP and through the (masqueraded) NodePort.
    let targets = [
        addr(NGINX_VIP, 8080),
        addr(lb_tests::sandbox::NODE_GATEWAY, manifests::NODE_PORT),
    ];
    // Long-lived connections that must survive every restart on their pod.
    let mut long_lived: Vec<(KeepAlive, String)> = (0..4)
        .map(|i| {
            let target = targets[i % 2];
            let mut c = sandbox
                .client()
                .run(move || KeepAlive::connect(target))
                .unwrap()
                .unwrap();
            let pod = c.get().unwrap();
            (c, pod)
        })
        .collect();
    // 32 clients making short connections all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // What failed, and when (to match with the agents' logs).
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..32)
        .map(|i| {
            let target = targets[i % 2];
            let (stop, ok, failed, failures) = (stop.clone(), ok.clone(), failed.clone(), failures.clone());
            sandbox
                .client()
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match http_get(target) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let at = std::time::SystemTime::now();
                                failures.lock().unwrap().push(format!("{at:?} {target}: {e:#}"));
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
                .unwrap()
        })
        .collect();
    let mut agent = agent;
    for (round, restart) in restarts.iter().enumerate() {
        let status = agent.stop().unwrap();
        assert!(status.success(), "round {round}: exit {status}");
        let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), sandbox.manifests_dir.as_os_str()];
        args.extend(restart.args.iter().map(std::ffi::OsStr::new));
        agent = Agent::start_with_env(&sandbox, &args, restart.envs, true).expect("restarted agent");
        assert!(
            agent.log().contains("took over the pinned maps"),
            "round {round}: maps not reused"
        );
        check(round, &sandbox, &agent);
        for (conn, pod) in &mut long_lived {
            assert_eq!(&conn.get().expect("established connection broken by a restart"), pod);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "restarts: {ok} connections succeeded, {failed} failed across {} restarts",
        restarts.len()
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed across restarts: {:#?}",
        ok + failed,
        failures.lock().unwrap()
    );
    assert!(ok > 100, "too little load: {ok}");
}

#[test]
fn restarts_under_load_drop_no_connection() {
    let same = Restart { args: &[], envs: &[] };
    restarts_under_load(&[same, same, same, same, same], |round, _, agent| {
        let log = agent.log();
        assert!(
            !log.contains("map: replaced") && !log.contains("map: migrating"),
            "round {round}: a restart with the same settings did not reuse every map:\n{log}"
        );
    });
}

/// Issue #13 point 5: a new conntrack size or layout migrates the flows.
#[test]
fn upgrades_that_resize_or_relayout_conntrack_drop_no_connection() {
    // lb-agent's test-only layout version override of CONNTRACK.
    const BUMP: &str = "LB_TEST_CONNTRACK_LAYOUT_VERSION";
    // Conntrack sizes well above what the load keeps live (~15,000 entries
    // a second, each closed flow held 10 s: ~150,000; a table at 131,072
    // evicted live flows now and then — LRU pressure, not migration). What
    // a smaller table keeps is datapath.rs's migration test. The service
    // and backend table sizes change in between.
    const SMALLER_TABLES: [&str; 4] = ["--max-services", "4096", "--max-backends", "16384"];
    let restarts = [
        Restart {
            args: &["--conntrack-max", "393216"],
            envs: &[],
        },
        Restart {
            args: &["--conntrack-max", "393216"],
            envs: &[(BUMP, "2")],
        },
        Restart {
            args: &[
                "--conntrack-max",
                "524288",
                SMALLER_TABLES[0],
                SMALLER_TABLES[1],
                SMALLER_TABLES[2],
                SMALLER_TABLES[3],
            ],
            envs: &[(BUMP, "2")],
        },
        Restart {
            args: &[
                "--conntrack-max",
                "524288",
                SMALLER_TABLES[0],
                SMALLER_TABLES[1],
                SMALLER_TABLES[2],
                SMALLER_TABLES[3],
            ],
            envs: &[(BUMP, "3")],
        },
        Restart {
            args: &["--conntrack-max", "393216"],
            envs: &[(BUMP, "3")],
        },
    ];
    restarts_under_load(&restarts, |round, sandbox, agent| {
        let log = agent.log();
        let migrated = log
            .lines()
            .find(|l| l.contains("map: migrated entries") && l.contains("CONNTRACK") && l.contains("before attach"))
            .unwrap_or_else(|| panic!("round {round}: CONNTRACK not migrated:\n{log}"));
        let copied = lb_tests::agent::log_field(migrated, "copied").unwrap_or(0);
        assert!(copied > 0, "round {round}: nothing copied: {migrated}");
        assert_eq!(
            lb_tests::agent::log_field(migrated, "dropped"),
            Some(0),
            "round {round}: {migrated}"
        );
        let services_replaced = log
            .lines()
            .any(|l| l.contains("map: replaced") && l.contains("\"SERVICES\""));
        assert_eq!(
            services_replaced,
            round == 2 || round == 4,
            "round {round}: SERVICES replaced when --max-services changes:\n{log}"
        );
        assert!(
            log.contains("migration done"),
            "round {round}: previous maps not removed:\n{log}"
        );
        assert!(
            !sandbox.bpf_root.join("migrate").exists(),
            "round {round}: the moved-aside maps are still pinned"
        );
    });
}

#[test]
fn long_lived_connection_stays_on_one_pod_while_endpoints_change() {
    let (sandbox, agent) = example_sandbox();
    // A socket belongs to the namespace it was opened in; it can then be
    // used from any thread.
    let mut conn = sandbox
        .client()
        .run(|| KeepAlive::connect(addr(NGINX_VIP, 8080)))
        .unwrap()
        .unwrap();
    let mut ask = |_: &Sandbox| conn.get().expect("request on the long-lived connection");
    let first = ask(&sandbox);
    for _ in 0..20 {
        assert_eq!(ask(&sandbox), first);
    }
    // Another endpoint leaves; the connection's pod stays.
    let pods = example_pods();
    let leaving = pods.iter().find(|(name, _)| name != &first).unwrap().0.clone();
    let kept: Vec<_> = pods.iter().filter(|(name, _)| name != &leaving).cloned().collect();
    apply(
        &sandbox,
        &agent,
        "net-test.yaml",
        &manifests::join(&[
            manifests::service(&nginx_service(&kept)),
            manifests::service(&udp_service(&pods)),
        ]),
    );
    for _ in 0..20 {
        assert_eq!(ask(&sandbox), first, "an established connection moved to another pod");
    }
}

#[test]
fn removed_endpoint_gets_no_new_connections_within_one_second() {
    let (sandbox, agent) = example_sandbox();
    let pods = example_pods();
    let remaining: Vec<_> = pods.iter().filter(|(n, _)| n != "nginx-b").cloned().collect();
    let took = apply(
        &sandbox,
        &agent,
        "net-test.yaml",
        &manifests::join(&[
            manifests::service(&nginx_service(&remaining)),
            manifests::service(&udp_service(&pods)),
        ]),
    );
    assert!(took < Duration::from_secs(1), "sync took {took:?}");
    let counts = spread(&sandbox, addr(NGINX_VIP, 8080), 60);
    assert!(
        !counts.contains_key("nginx-b"),
        "removed pod still got new connections: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "the others still answer: {counts:?}");
}

#[test]
fn deleted_service_stops_answering_on_its_vip() {
    let (sandbox, agent) = example_sandbox();
    assert!(get(&sandbox, addr(NGINX_VIP, 8080)).is_ok());
    let pods = example_pods();
    apply(
        &sandbox,
        &agent,
        "net-test.yaml",
        &manifests::service(&udp_service(&pods)),
    );
    let result = get(&sandbox, addr(NGINX_VIP, 8080));
    assert!(result.is_err(), "the deleted service still answered: {result:?}");
    // The other service is untouched.
    assert!(sandbox.client().run(|| udp_query(addr(UDP_VIP, 53))).unwrap().is_ok());
}

#[test]
fn udp_service_round_trips_to_every_pod() {
    let (sandbox, _agent) = example_sandbox();
    let answers = sandbox
        .client()
        .run(|| {
            (0..60)
                .map(|_| udp_query(addr(UDP_VIP, 53)).expect("UDP answer"))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let distinct: std::collections::BTreeSet<_> = answers.iter().cloned().collect();
    assert_eq!(
        distinct.into_iter().collect::<Vec<_>>(),
        PODS,
        "answers came from the pods, as the VIP"
    );
}

#[test]
fn same_vip_different_ports_route_independently() {
    let sandbox = Sandbox::new("lbt-", &PODS).unwrap();
    let pods = example_pods();
    let vip = Ipv4Addr::new(198, 19, 0, 20);
    let web = ServiceDef {
        name: "web",
        cluster_ip: vip,
        ports: vec![PortDef {
            name: "",
            protocol: "TCP",
            port: 8080,
            target_port: 80,
        }],
        endpoints: pods[..1].to_vec(),
    };
    let mut api = web.clone();
    api.name = "api";
    api.ports[0].port = 9090;
    api.endpoints = pods[1..].to_vec();
    sandbox
        .write_manifest(
            "svc.yaml",
            &manifests::join(&[manifests::service(&web), manifests::service(&api)]),
        )
        .unwrap();
    let _agent = Agent::start(&sandbox, true).unwrap();
    let web_counts = spread(&sandbox, addr(vip, 8080), 30);
    let api_counts = spread(&sandbox, addr(vip, 9090), 30);
    assert_eq!(web_counts.keys().collect::<Vec<_>>(), ["nginx-a"]);
    assert_eq!(api_counts.keys().collect::<Vec<_>>(), ["nginx-b", "nginx-c"]);
}

#[test]
fn interface_created_after_start_is_attached() {
    let (mut sandbox, agent) = example_sandbox();
    let from = agent.log_position();
    sandbox.add_client("late-client").unwrap();
    let host_if = agent
        .wait_for_log(from, "attached TC ingress", Duration::from_secs(5))
        .unwrap();
    assert!(host_if.contains("veth"), "{host_if}");
    let late = &sandbox.clients[1].ns;
    let counts = late
        .run(|| {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..30 {
                seen.insert(http_get(addr(NGINX_VIP, 8080)).expect("request from the new interface"));
            }
            seen
        })
        .unwrap();
    assert!(counts.len() >= 2, "{counts:?}");
}

#[test]
fn invalid_manifest_is_reported_and_other_services_keep_working() {
    let (sandbox, agent) = example_sandbox();
    let from = agent.log_position();
    sandbox
        .write_manifest(
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: net-test}\nspec:\n  clusterIP: 198.19.0.30\n  ports: [{port: seventy}]\n",
        )
        .unwrap();
    let line = agent
        .wait_for_log(from, "invalid manifest", Duration::from_secs(5))
        .unwrap();
    assert!(
        line.contains("broken.yaml") && line.contains("document 1") && line.contains("spec.ports[0].port"),
        "{line}"
    );
    let counts = spread(&sandbox, addr(NGINX_VIP, 8080), 30);
    assert_eq!(counts.values().sum::<usize>(), 30);
}

#[test]
fn metrics_and_health_endpoints_report_the_datapath() {
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    let manifests = OsStr::new("--manifests");
    let per_backend = OsStr::new("--metrics-per-backend");
    let _agent = Agent::start_with(
        &sandbox,
        &[manifests, sandbox.manifests_dir.as_os_str(), per_backend],
        true,
    )
    .expect("agent");
    spread(&sandbox, addr(NGINX_VIP, 8080), 30);
    let metrics = sandbox.node_get(10249, "/metrics");
    assert!(
        metrics
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{metrics}"
    );
    let line = metrics
        .lines()
        .find(|l| l.starts_with("lbagent_service_packets_total{") && l.contains("198.19.0.10:8080/TCP"))
        .unwrap_or_else(|| panic!("no per-service packet counter:\n{metrics}"));
    let packets: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(packets >= 30 * 3, "{line}");
    for needle in [
        "lbagent_drops_total{reason=\"truncated\"} 0",
        // nginx-service, udp-echo, and the NodePort service: its cluster IP
        // plus the NodePort on the node address and on localhost.
        "lbagent_service_ports 5",
        "lbagent_sync_duration_seconds_count",
        "lbagent_map_capacity{map=\"CONNTRACK\"}",
        "lbagent_backend_packets_total{",
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(needle), "metrics lack {needle}:\n{metrics}");
    }
    // A real scrape passes Prometheus' own checks.
    let (_, body) = metrics.split_once("\r\n\r\n").expect("an HTTP body");
    assert!(body.contains("kubeproxy_"), "{body}");
    if let Err(problems) = lb_tests::promtool::check_metrics(body) {
        panic!("promtool check metrics on the scrape:\n{problems}\n{body}");
    }
    let health = sandbox.node_get(10256, "/healthz");
    assert!(
        health.starts_with("HTTP/1.0 200") && health.contains("\"lastUpdated\""),
        "{health}"
    );
    assert!(sandbox.node_get(10256, "/livez").starts_with("HTTP/1.0 200"));
}

/// `lb-agent ARGS --bpf-root ROOT -o FORMAT`'s output, in the node namespace.
fn agent_output(sandbox: &Sandbox, args: &[&str], format: &str) -> String {
    let bin = lb_tests::agent::agent_bin();
    let out = lb_tests::netns::run(
        sandbox
            .node
            .command(bin.to_str().unwrap())
            .args(args)
            .arg("--bpf-root")
            .arg(&sandbox.bpf_root)
            .args(["-o", format]),
    )
    .unwrap_or_else(|e| panic!("lb-agent {args:?}: {e:#}"));
    String::from_utf8(out.stdout).unwrap()
}

/// `lb-agent ARGS --bpf-root ROOT -o json`, in the node namespace.
fn agent_json(sandbox: &Sandbox, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&agent_output(sandbox, args, "json")).unwrap()
}

#[test]
fn inspect_and_trace_show_what_the_kernel_does() {
    let (sandbox, _agent) = example_sandbox();
    spread(&sandbox, addr(NGINX_VIP, 8080), 30);

    let stats = agent_json(&sandbox, &["stats"]);
    let row = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "198.19.0.10:8080/TCP")
        .expect("service row");
    assert!(row["packets"].as_u64().unwrap() >= 90, "{row}");
    // Drops and events are listed by name, also when zero.
    for (kind, name) in [("drop", "no_route"), ("event", "tcp_mid_flow_conntrack_miss")] {
        assert!(
            stats
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["kind"] == kind && r["name"] == name),
            "{kind} {name} missing: {stats}"
        );
    }
    let backends = agent_json(&sandbox, &["backends", "198.19.0.10:8080/TCP"]);
    assert_eq!(backends.as_array().unwrap().len(), 3, "{backends}");
    let maps = agent_json(&sandbox, &["maps"]);
    assert!(
        maps.as_array().unwrap().iter().any(|m| m["map"] == "CONNTRACK"),
        "{maps}"
    );
    let ct = agent_json(&sandbox, &["conntrack", "--service", "198.19.0.10:8080/TCP"]);
    let ct_before = ct.as_array().unwrap().len();
    assert!(ct_before > 0);
    // Expiry from now, within the flow's lifetime (not the raw clock).
    let status = agent_json(&sandbox, &["status"]);
    let lifetime = status["config"]["tcp_established_timeout"].as_i64().unwrap();
    for e in ct.as_array().unwrap() {
        let left = e["expires_in"].as_i64().unwrap();
        assert!(0 < left && left <= lifetime, "{e} (lifetime {lifetime})");
    }
    let table = agent_output(&sandbox, &["conntrack"], "table");
    assert!(table.contains("EXPIRES-IN"), "{table}");
    for line in table.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let expiry = line.split_whitespace().last().unwrap();
        assert!(expiry.ends_with('s') && expiry.len() < 10, "{line}");
    }
    // Status from the pins: layouts, links, settings and fill levels.
    assert_eq!(status["config"]["forwarding_mode"], "redirect", "{status}");
    assert_eq!(status["last_sync"], "unknown", "{status}");
    // With the agent's metrics: when it last synced.
    let synced = agent_json(&sandbox, &["status", "--metrics-address", "127.0.0.1:10249"]);
    assert!(synced["last_sync_unix"].as_f64() > Some(0.0), "{synced}");
    assert!(synced["last_sync"].as_str().unwrap().ends_with("s ago"), "{synced}");
    assert!(
        status["layouts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("CONNTRACK-v")),
        "{status}"
    );
    assert!(
        status["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["interface"].is_string()),
        "{status}"
    );
    assert!(
        status["maps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["map"] == "CONNTRACK" && m["entries"].as_u64() > Some(0)),
        "{status}"
    );
    let services = agent_output(&sandbox, &["services"], "yaml");
    assert!(services.contains("- frontend: 198.19.0.10:8080/TCP"), "{services}");
    let wide = agent_output(&sandbox, &["maps"], "wide");
    assert!(wide.contains("FILL"), "{wide}");

    // A packet to the service: balanced to a pod, client kept; no trace left in conntrack.
    let t = agent_json(
        &sandbox,
        &["trace", "--src", "198.18.2.10:41000", "--dst", "198.19.0.10:8080"],
    );
    assert_eq!(t["verdict"], "forward (redirect)", "{t}");
    assert_eq!(t["frontend"], "198.19.0.10:8080/TCP", "{t}");
    assert_eq!(t["out_src"], "198.18.2.10:41000", "{t}");
    let to = t["out_dst"].as_str().unwrap();
    assert!(
        ["198.18.1.11:80", "198.18.1.12:80", "198.18.1.13:80"].contains(&to),
        "{t}"
    );
    assert_eq!(t["masqueraded"], false);
    let ct_after = agent_json(&sandbox, &["conntrack", "--service", "198.19.0.10:8080/TCP"])
        .as_array()
        .unwrap()
        .len();
    assert_eq!(ct_after, ct_before, "trace left conntrack entries");

    // A cluster IP on a port it lacks: rejected.
    let t = agent_json(
        &sandbox,
        &["trace", "--src", "198.18.2.10", "--dst", "198.19.0.10:9999"],
    );
    assert_eq!(t["drop_reason"], "rejected_no_endpoints", "{t}");
    assert_eq!(t["frontend"], serde_json::Value::Null, "{t}");
}

#[test]
fn killed_agent_leaves_the_datapath_serving_and_the_next_one_reconciles() {
    let (sandbox, agent) = example_sandbox();
    agent.kill().unwrap();
    // Nobody is watching: the last programmed state keeps serving.
    assert_eq!(spread(&sandbox, addr(NGINX_VIP, 8080), 30).values().sum::<usize>(), 30);
    // While the agent is gone, the UDP service is deleted and a pod leaves nginx-service.
    let pods = example_pods();
    sandbox
        .write_manifest("net-test.yaml", &manifests::service(&nginx_service(&pods[..2])))
        .unwrap();
    let agent = Agent::start(&sandbox, true).expect("restarted agent");
    assert!(agent.log().contains("took over the pinned maps"));
    let view = agent.services().unwrap();
    assert_eq!(
        view.keys().collect::<Vec<_>>(),
        ["198.19.0.10:8080/TCP"],
        "stale service left: {view:?}"
    );
    assert_eq!(view["198.19.0.10:8080/TCP"], ["198.18.1.11:80", "198.18.1.12:80"]);
    let counts = spread(&sandbox, addr(NGINX_VIP, 8080), 30);
    assert!(!counts.contains_key("nginx-c"), "{counts:?}");
}
