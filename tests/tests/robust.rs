//! The agent never dies on a recoverable error, and fails start-up loudly
//! on what cannot work: pod churn, ports already taken, a half-removed pin
//! tree, node settings left in the pinned CONFIG map.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use lb_tests::client::{http_get, tally};
use lb_tests::manifests::{self, NGINX_VIP};
use lb_tests::{Agent, Sandbox};

const PODS: [&str; 3] = ["nginx-a", "nginx-b", "nginx-c"];

fn vip() -> SocketAddr {
    SocketAddr::from((NGINX_VIP, 8080))
}

/// The value of `series` in /metrics.
fn metric(sandbox: &Sandbox, series: &str) -> u64 {
    let metrics = sandbox.node_get(10249, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"))
}

/// `lbagent_errors_total{operation="OP"}` from /metrics.
fn errors_counted(sandbox: &Sandbox, operation: &str) -> u64 {
    metric(sandbox, &format!("lbagent_errors_total{{operation=\"{operation}\"}}"))
}

/// `ip -n NODE -batch FILE` with `lines`.
fn ip_batch(sandbox: &Sandbox, name: &str, lines: impl Iterator<Item = String>) {
    let file = std::env::temp_dir().join(format!("{}-{name}.batch", sandbox.id));
    std::fs::write(&file, lines.collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let result = lb_tests::netns::ip(&["-n", &sandbox.node.name, "-batch", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    result.unwrap();
}

/// Waits until `cond` holds on /metrics (the agent has no log line to
/// wait on for a counted race), polling briefly.
fn wait_for_metric(sandbox: &Sandbox, what: &str, cond: impl Fn(&Sandbox) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond(sandbox) {
        assert!(std::time::Instant::now() < deadline, "{what} never counted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pod_churn_of_200_veths_is_survived_and_counted() {
    let mut sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    sandbox.wire_for_xdp().unwrap();
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    let client_if = sandbox.client_host_if();
    let late_if = format!("veth{}", PODS.len() + 1);
    // TC on the sandbox's own veths only (attaching to 400 more would take
    // the agent seconds); generic XDP lists every device for egress.
    let tc_interfaces = (0..=PODS.len() + 1)
        .map(|i| format!("veth{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let args = [
        "--manifests",
        sandbox.manifests_dir.to_str().unwrap(),
        "--interfaces",
        &tc_interfaces,
        "--xdp-mode",
        "generic",
        "--xdp-interfaces",
        &client_if,
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let agent = Agent::start_with(&sandbox, &args, true).expect("agent");
    let from = agent.log_position();
    // 400 interfaces (both ends in the node): more than XDP_EGRESS holds.
    ip_batch(
        &sandbox,
        "add",
        (0..200).map(|i| format!("link add ch{i} type veth peer name cp{i}")),
    );
    wait_for_metric(&sandbox, "XDP_EGRESS over capacity", |s| {
        errors_counted(s, "xdp_egress") > 0
    });
    // Deleted again, and 100 more created and deleted at once: their
    // events reach the agent after the devices are gone.
    ip_batch(
        &sandbox,
        "del",
        (0..200)
            .map(|i| format!("link del ch{i}"))
            .chain((200..300).flat_map(|i| {
                [
                    format!("link add ch{i} type veth peer name cp{i}"),
                    format!("link del ch{i}"),
                ]
            })),
    );
    // Link events are handled in order: once an interface made after the
    // churn is attached, the agent has been through all of it.
    sandbox.add_client("late-client").unwrap();
    agent
        .wait_for_line(
            from,
            "late client attached",
            |l| l.contains("attached TC ingress") && l.contains(&format!("interface={late_if} ")),
            Duration::from_secs(20),
        )
        .expect("the agent survives the churn and attaches the next interface");
    let log = agent.log();
    assert!(log.contains("recovered; counted in lbagent_errors_total") && log.contains("capacity 256"));
    // An interface gone before its insert is a race, counted apart.
    let vanished = metric(&sandbox, "lbagent_interfaces_vanished_total");
    assert!(vanished > 0, "no vanished interface counted:\n{log}");
    assert!(log.contains("the interface is gone already"));
    // The egress list is back to the node's devices: the 5 veths.
    let dump = lb_tests::netns::run(
        std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(sandbox.bpf_root.join("XDP_EGRESS")),
    )
    .unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&dump.stdout).unwrap();
    assert_eq!(entries.len(), PODS.len() + 2, "XDP_EGRESS after the churn: {entries:?}");
    let late = &sandbox.clients[1].ns;
    let counts = tally(late, 30, vip(), http_get).expect("requests through the service after the churn");
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
    let counts = tally(sandbox.client(), 30, vip(), http_get).expect("requests through XDP after the churn");
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
}

/// Takes `addr` in the node namespace; the socket keeps it until dropped.
fn take_port(sandbox: &Sandbox, addr: SocketAddr) -> TcpListener {
    sandbox
        .node
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .expect("binding")
}

#[test]
fn taken_metrics_or_healthz_port_fails_start_up_naming_the_flag() {
    let sandbox = Sandbox::new("lbt-", &PODS[..1]).expect("sandbox");
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    let source = [std::ffi::OsStr::new("--manifests"), sandbox.manifests_dir.as_os_str()];
    for (addr, flag) in [
        (SocketAddr::from((Ipv4Addr::LOCALHOST, 10249)), "--metrics-bind-address"),
        (
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 10256)),
            "--healthz-bind-address",
        ),
    ] {
        let taken = take_port(&sandbox, addr);
        let agent = Agent::spawn(&sandbox, &source, true).unwrap();
        agent
            .wait_for_log(0, "<exited>", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("the agent keeps running with {addr} taken: {e:#}"));
        let log = agent.log();
        let status = agent.stop().unwrap();
        assert!(!status.success(), "exit status {status}");
        assert!(
            log.contains(flag) && log.contains("cannot listen"),
            "the error does not name {flag}:\n{log}"
        );
        assert!(!log.contains(" ready"), "got ready first:\n{log}");
        drop(taken);
    }
}

#[test]
fn taken_health_check_node_port_is_counted_and_other_services_work() {
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    let pod = sandbox.pod("nginx-a").ip;
    let local = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web-local, namespace: net-test}}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.50\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{{name: http, port: 80, targetPort: 80, nodePort: 30050}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-local\n  namespace: net-test\n  labels: {{kubernetes.io/service-name: web-local}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 80}}]\nendpoints:\n- addresses: ['{pod}']\n  conditions: {{ready: true}}\n  nodeName: node-1\n"
    );
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    sandbox.write_manifest("web-local.yaml", &local).unwrap();
    let taken = take_port(&sandbox, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 32000)));
    let agent = Agent::start(&sandbox, true).expect("the agent starts with a health check port taken");
    agent
        .wait_for_log(0, "health check port 32000", Duration::from_secs(5))
        .unwrap();
    assert!(errors_counted(&sandbox, "health_check_port") >= 1);
    let counts = tally(sandbox.client(), 30, vip(), http_get).expect("other services");
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
    let local_vip = SocketAddr::from(([198, 19, 0, 50], 80));
    assert_eq!(
        sandbox.client().run(move || http_get(local_vip)).unwrap().unwrap(),
        "nginx-a"
    );
    // Freed, the port is opened on the next sync.
    drop(taken);
    let from = agent.log_position();
    sandbox
        .write_manifest(
            "late.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: net-test}\nspec:\n  clusterIP: 198.19.0.60\n  ports: [{port: 80}]\n",
        )
        .unwrap();
    agent
        .wait_for_line(
            from,
            "health check server started on 32000",
            |l| l.contains("health check server started") && l.contains("port=32000"),
            Duration::from_secs(5),
        )
        .unwrap();
}

fn cleanup(sandbox: &Sandbox) -> std::process::Output {
    std::process::Command::new(lb_tests::agent::agent_bin())
        .args(["cleanup", "--bpf-root"])
        .arg(&sandbox.bpf_root)
        .output()
        .unwrap()
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn cleanup_of_a_half_removed_pin_tree_reports_leftovers_and_is_idempotent() {
    let sandbox = Sandbox::new("lbt-", &PODS[..1]).expect("sandbox");
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    let agent = Agent::start(&sandbox, true).expect("agent");
    agent.kill().unwrap();
    let root = &sandbox.bpf_root;
    // Half removed: some maps and a link pin gone; something not ours.
    std::fs::remove_file(root.join("SERVICES")).unwrap();
    std::fs::remove_file(root.join("CONNTRACK")).unwrap();
    let links = root.join("links");
    let first_link = names_in(&links).into_iter().next().expect("a pinned link");
    std::fs::remove_file(links.join(first_link)).unwrap();
    std::fs::create_dir(root.join("stray-tool")).unwrap();

    let out = cleanup(&sandbox);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "cleanup reports success with a leftover:\n{stderr}"
    );
    assert!(
        stderr.contains("stray-tool") && stderr.contains("not the agent's"),
        "{stderr}"
    );
    assert_eq!(names_in(root), ["stray-tool"], "everything of the agent's removed");

    std::fs::remove_dir(root.join("stray-tool")).unwrap();
    for run in ["second", "third"] {
        let out = cleanup(&sandbox);
        assert!(
            out.status.success(),
            "{run} cleanup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!root.exists(), "{run} cleanup left {}", root.display());
    }
}

#[test]
fn node_settings_left_in_the_pinned_config_map_are_rewritten_on_restart() {
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    Agent::start(&sandbox, true).expect("agent").kill().unwrap();
    let config = sandbox.bpf_root.join("CONFIG");
    let bpftool =
        |args: &[&str]| lb_tests::netns::run(std::process::Command::new("bpftool").args(args).arg(&config)).unwrap();
    // Garbage in every field (an older agent, a stray write).
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["map", "update", "pinned"])
        .arg(&config)
        .args(["key", "0", "0", "0", "0", "value"])
        .args(["0xff"; 40]);
    lb_tests::netns::run(&mut cmd).unwrap();
    let _agent = Agent::start(&sandbox, true).expect("restarted agent");
    let dump = String::from_utf8_lossy(&bpftool(&["map", "dump", "pinned"]).stdout).into_owned();
    for field in ["\"flags\": 0,", "\"_pad\": 0", "\"tcp_established_timeout\": 86400,"] {
        assert!(dump.contains(field), "CONFIG lacks {field}:\n{dump}");
    }
    assert!(!dump.contains("4294967295"), "garbage survived:\n{dump}");
    let counts = tally(sandbox.client(), 10, vip(), http_get).expect("requests");
    assert_eq!(counts.values().sum::<usize>(), 10);
}

#[test]
fn services_beyond_capacity_are_counted_and_the_rest_served() {
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    sandbox.write_manifest("net-test.yaml", &manifests::example()).unwrap();
    let args = [
        "--manifests",
        sandbox.manifests_dir.to_str().unwrap(),
        "--max-services",
        "3",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let agent = Agent::start_with(&sandbox, &args, true).expect("the agent starts with too many services");
    agent
        .wait_for_log(0, "service ids exhausted", Duration::from_secs(5))
        .unwrap();
    assert!(errors_counted(&sandbox, "sync") >= 1);
    let programmed = agent
        .wait_for_services(|s| !s.is_empty(), Duration::from_secs(5))
        .unwrap();
    assert!(programmed.len() < 5, "{programmed:?}");
    // What fitted (the NodePort, in frontend order) serves.
    let node_port = SocketAddr::from((lb_tests::sandbox::NODE_GATEWAY, manifests::NODE_PORT));
    assert!(programmed.contains_key(&format!("{node_port}/TCP")), "{programmed:?}");
    let counts = tally(sandbox.client(), 10, node_port, http_get).expect("the NodePort that fitted");
    assert_eq!(counts.values().sum::<usize>(), 10);
    // Retried (as full resyncs) without ending the agent.
    let from = agent.log_position();
    agent
        .wait_for_log(from, "service ids exhausted", Duration::from_secs(5))
        .unwrap();
}
