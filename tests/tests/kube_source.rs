//! The Kubernetes source against a fake API server (list + watch JSON,
//! bookmarks, 410 Gone, outages): the agent follows Services and
//! EndpointSlices into the kernel maps, and real traffic follows too.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use lb_tests::client::{http_get, tally};
use lb_tests::fake_apiserver::FakeApiServer;
use lb_tests::manifests::{self, NGINX_VIP, PortDef, ServiceDef, example_pods, nginx_service};
use lb_tests::{Agent, Sandbox};
use std::ffi::OsStr;

const PODS: [&str; 3] = ["nginx-a", "nginx-b", "nginx-c"];
const NGINX: &str = "198.19.0.10:8080/TCP";
const WAIT: Duration = Duration::from_secs(10);

type View = BTreeMap<String, Vec<String>>;

/// Sandbox + fake API server (listening in the node namespace) holding the
/// example objects + an agent on it.
fn cluster() -> (Sandbox, FakeApiServer, Agent) {
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    let listener = sandbox.node.run(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let api = FakeApiServer::start(listener).unwrap();
    api.apply_yaml(&manifests::example());
    let kubeconfig = sandbox.manifests_dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let agent = Agent::start_kube(&sandbox, &kubeconfig, true).expect("agent on the fake API server");
    (sandbox, api, agent)
}

fn backends(ips: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}:80")).collect();
    v.sort();
    v
}

fn has(view: &View, frontend: &str, want: &[String]) -> bool {
    view.get(frontend).is_some_and(|b| b == want)
}

fn spread(sandbox: &Sandbox, n: usize) -> BTreeMap<String, usize> {
    tally(sandbox.client(), n, SocketAddr::from((NGINX_VIP, 8080)), http_get).expect("requests through the VIP")
}

fn yaml(text: &str) -> serde_json::Value {
    serde_norway::from_str(text).unwrap()
}

#[test]
fn initial_list_then_service_add_modify_delete_reach_the_maps() {
    let (sandbox, api, agent) = cluster();
    let all = backends(&["198.18.1.11", "198.18.1.12", "198.18.1.13"]);
    agent.wait_for_services(|v| has(v, NGINX, &all), WAIT).unwrap();
    assert_eq!(spread(&sandbox, 60).len(), 3);

    // Add a service.
    let pods = example_pods();
    let web = ServiceDef {
        name: "web",
        cluster_ip: "198.19.0.30".parse().unwrap(),
        ports: vec![PortDef {
            name: "http",
            protocol: "TCP",
            port: 80,
            target_port: 80,
        }],
        endpoints: pods[..1].to_vec(),
    };
    api.apply_yaml(&manifests::service(&web));
    agent
        .wait_for_services(|v| has(v, "198.19.0.30:80/TCP", &backends(&["198.18.1.11"])), WAIT)
        .unwrap();

    // Modify: an endpoint leaves nginx-service's slice.
    api.apply_yaml(&manifests::service(&nginx_service(&pods[1..])));
    agent
        .wait_for_services(|v| has(v, NGINX, &backends(&["198.18.1.12", "198.18.1.13"])), WAIT)
        .unwrap();
    let counts = spread(&sandbox, 40);
    assert!(!counts.contains_key("nginx-a"), "{counts:?}");

    // Delete the new service: its frontend goes, the others stay.
    api.delete("Service", "net-test", "web");
    let view = agent
        .wait_for_services(|v| !v.contains_key("198.19.0.30:80/TCP"), WAIT)
        .unwrap();
    assert!(view.contains_key(NGINX), "{view:?}");
}

#[test]
fn slices_split_and_not_ready_endpoints_fall_back_to_terminating() {
    let (sandbox, api, agent) = cluster();
    // A second slice for nginx-service: endpoints are merged. Its change
    // began now (the endpoints controller's trigger time).
    let now = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .unwrap();
    let now = String::from_utf8(now.stdout).unwrap();
    api.apply(yaml(&format!(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: nginx-service-second
  namespace: net-test
  labels: {{kubernetes.io/service-name: nginx-service}}
  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: "{}"}}
addressType: IPv4
ports: [{{name: "", protocol: TCP, port: 80}}]
endpoints:
- addresses: ["198.18.1.14"]
  conditions: {{ready: true}}
"#,
        now.trim()
    )));
    let four = backends(&["198.18.1.11", "198.18.1.12", "198.18.1.13", "198.18.1.14"]);
    agent.wait_for_services(|v| has(v, NGINX, &four), WAIT).unwrap();
    // kube-proxy's network programming latency: that one change, programmed
    // within the test's few seconds.
    let deadline = std::time::Instant::now() + WAIT;
    let metrics = loop {
        let metrics = sandbox
            .node
            .run(|| lb_tests::client::raw_http_get(([127, 0, 0, 1], 10249).into(), "/metrics"))
            .unwrap()
            .unwrap();
        if metrics.contains("kubeproxy_network_programming_duration_seconds_count")
            || std::time::Instant::now() > deadline
        {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for needle in [
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1\n",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 1\n",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"5\"} 1\n",
    ] {
        assert!(metrics.contains(needle), "no {needle} in\n{metrics}");
    }
    assert!(
        !metrics.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 0\n"),
        "{metrics}"
    );

    // Every endpoint stops being ready; one is still serving while terminating.
    api.delete("EndpointSlice", "net-test", "nginx-service-second");
    api.apply(yaml(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: nginx-service-x7k2p, namespace: net-test, labels: {kubernetes.io/service-name: nginx-service}}
addressType: IPv4
ports: [{name: "", protocol: TCP, port: 80}]
endpoints:
- addresses: ["198.18.1.11"]
  conditions: {ready: false, serving: false, terminating: true}
- addresses: ["198.18.1.12"]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: ["198.18.1.13"]
  conditions: {ready: false}
"#,
    ));
    agent
        .wait_for_services(|v| has(v, NGINX, &backends(&["198.18.1.12"])), WAIT)
        .unwrap();
}

#[test]
fn relist_after_410_keeps_the_programmed_state() {
    let (sandbox, api, agent) = cluster();
    let all = backends(&["198.18.1.11", "198.18.1.12", "198.18.1.13"]);
    agent.wait_for_services(|v| has(v, NGINX, &all), WAIT).unwrap();
    let from = agent.log_position();
    let watches = api.watch_requests();

    // History is compacted and watches dropped; a change lands meanwhile: a
    // new service (not a removed endpoint, whose connections would be
    // re-balanced mid-flight by design while the requests below run).
    api.expire_watches();
    let late = ServiceDef {
        name: "late",
        cluster_ip: std::net::Ipv4Addr::new(198, 19, 0, 50),
        ..nginx_service(&example_pods())
    };
    api.apply_yaml(&manifests::service(&late));

    // The agent relists (its re-watch got 410) ...
    agent.wait_for_log(from, "listed", WAIT).unwrap();
    assert!(api.watch_requests() > watches);
    // ... keeps serving throughout, and ends up with the change.
    assert_eq!(spread(&sandbox, 30).values().sum::<usize>(), 30);
    agent
        .wait_for_services(|v| has(v, "198.19.0.50:8080/TCP", &all), WAIT)
        .unwrap();
    assert!(has(&agent.services().unwrap(), NGINX, &all), "relist changed NGINX");
    let view = agent.services().unwrap();
    assert!(
        view.contains_key("198.19.0.11:53/UDP"),
        "relist lost a service: {view:?}"
    );
}

#[test]
fn api_server_outage_keeps_the_datapath_working() {
    let (sandbox, api, agent) = cluster();
    let all = backends(&["198.18.1.11", "198.18.1.12", "198.18.1.13"]);
    agent.wait_for_services(|v| has(v, NGINX, &all), WAIT).unwrap();
    api.set_down(true);
    // Every watch of the agent has hit the outage.
    api.wait_refused(3, WAIT).unwrap();
    // Down: the last state keeps serving.
    assert_eq!(spread(&sandbox, 60).len(), 3);
    assert!(has(&agent.services().unwrap(), NGINX, &all));

    // Back: changes flow again.
    api.set_down(false);
    api.apply_yaml(&manifests::service(&nginx_service(&example_pods()[2..])));
    agent
        .wait_for_services(|v| has(v, NGINX, &backends(&["198.18.1.13"])), Duration::from_secs(30))
        .unwrap();
}

#[test]
fn nothing_is_programmed_before_the_first_complete_list() {
    let sandbox = Sandbox::new("lbt-", &PODS).unwrap();
    let listener = sandbox.node.run(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let api = FakeApiServer::start(listener).unwrap();
    api.apply_yaml(&manifests::example());
    api.set_down(true);
    let kubeconfig = sandbox.manifests_dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let agent = Agent::spawn(&sandbox, &[OsStr::new("--kubeconfig"), kubeconfig.as_os_str()], true).unwrap();

    // The API answers 503: the agent retries and programs nothing.
    api.wait_refused(6, WAIT).unwrap();
    assert!(
        !agent.log().contains("first sync done"),
        "synced without a list:\n{}",
        agent.log()
    );
    assert!(!sandbox.bpf_root.join("SERVICES").exists() || agent.services().unwrap().is_empty());

    api.set_down(false);
    agent.wait_for_log(0, " ready", Duration::from_secs(30)).unwrap();
    let log = agent.log();
    let listed = log.find("initial list").expect("initial list logged");
    let first_sync = log.find("first sync done").expect("first sync logged");
    assert!(listed < first_sync, "synced before the initial list:\n{log}");
    assert!(!agent.services().unwrap().is_empty());
}

/// A fresh node without kube-proxy: in-cluster config names the
/// `kubernetes` Service's cluster IP, which nothing programs yet. With
/// `--master` (kube-proxy's flag) naming the API server at a node address
/// the agent lists, programs and follows changes; without it, it never gets
/// anywhere (and says so).
#[test]
fn master_flag_reaches_the_api_server_before_its_service_is_programmed() {
    let sandbox = Sandbox::new("lbt-", &PODS).unwrap();
    let node_addr = lb_tests::sandbox::NODE_GATEWAY;
    let listener = sandbox
        .node
        .run(move || TcpListener::bind((node_addr, 0)))
        .unwrap()
        .unwrap();
    let api = FakeApiServer::start(listener).unwrap();
    api.apply_yaml(&manifests::example());
    // What the kubelet injects into every pod: the `kubernetes` Service.
    // (No kubeconfig may be found either.)
    let in_cluster = [
        ("KUBERNETES_SERVICE_HOST", "198.19.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
        ("KUBECONFIG", "/nonexistent/kubeconfig"),
    ];
    let spawn = |args: &[&OsStr]| {
        Agent::spawn_in_with_env(
            &sandbox.node,
            lb_tests::sandbox::NODE_NAME,
            &sandbox.bpf_root,
            args,
            &in_cluster,
            true,
        )
        .unwrap()
    };

    // Without --master: in-cluster config (no service account here) leads nowhere.
    let lost = spawn(&[]);
    lost.wait_for_log(0, "cannot set up the Kubernetes API client", WAIT)
        .unwrap();
    lost.wait_for_log(0, "<exited>", WAIT).expect("the agent exits at once");

    let master = format!("http://{}", api.addr());
    let agent = spawn(&[OsStr::new("--master"), OsStr::new(&master)]).ready().unwrap();
    let all = backends(&["198.18.1.11", "198.18.1.12", "198.18.1.13"]);
    agent.wait_for_services(|v| has(v, NGINX, &all), WAIT).unwrap();
    assert_eq!(spread(&sandbox, 30).len(), 3);
    api.apply_yaml(&manifests::service(&nginx_service(&example_pods()[..1])));
    agent
        .wait_for_services(|v| has(v, NGINX, &backends(&["198.18.1.11"])), WAIT)
        .unwrap();
}
