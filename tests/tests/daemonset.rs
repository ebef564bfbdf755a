//! The DaemonSet that users apply, executed: `deploy/` rendered by
//! kustomize, its pod template run by podman (runc) in the sandbox node's
//! network namespace with the image built from this repository — its
//! capabilities, volumes, env and args, nothing added — against the API
//! server fixture reached at a node address (`--master`: no `kubernetes`
//! Service is programmed on a fresh node). It must serve pods and host
//! processes, answer its probes, log JSON, and survive a container kill
//! without dropping a connection.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lb_tests::client::{KeepAlive, http_get, raw_http_get, status_of, tally};
use lb_tests::fake_apiserver::FakeApiServer;
use lb_tests::image;
use lb_tests::manifests::{self, NGINX_VIP};
use lb_tests::podspec::{PodRun, Rendered};
use lb_tests::sandbox::{NODE_GATEWAY, NODE_NAME};
use lb_tests::{Sandbox, cleanup};

const PODS: [&str; 3] = ["nginx-a", "nginx-b", "nginx-c"];

/// What kube-proxy leaves on a node it ran on (nat portals, a service and
/// its endpoint, the masquerade chain).
const KUBE_PROXY_LEFTOVERS: &str = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
    -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
    -A POSTROUTING -j KUBE-POSTROUTING\n\
    -A KUBE-SERVICES -d 198.19.0.99/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-X\n\
    -A KUBE-SVC-X -p tcp -j DNAT --to-destination 198.18.1.11:80\nCOMMIT\n";

/// The image under test; removed when dropped.
struct TestImage(String);

impl TestImage {
    /// None where containers cannot run (LB_TESTS_NO_CONTAINERS set, on
    /// hosts without a usable podman): the test says so and skips. Here
    /// `cargo xtask setup` installs podman, so a missing one fails.
    fn build() -> Option<Self> {
        if std::env::var_os("LB_TESTS_NO_CONTAINERS").is_some() {
            eprintln!("SKIPPED: LB_TESTS_NO_CONTAINERS is set (podman cannot run containers here)");
            return None;
        }
        if let Some(why) = image::podman_missing() {
            panic!("podman cannot run here: {why} (or set LB_TESTS_NO_CONTAINERS=1 where it never can)");
        }
        let tag = format!("localhost/lb-agent:lbt-{}", std::process::id());
        image::build(&lb_tests::agent::agent_bin(), &tag).expect("building the agent image");
        Some(TestImage(tag))
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = image::podman(&["rmi", "--force", &self.0]);
    }
}

/// The HTTP status of GET `path` on the node's health port, if any answer.
fn probe(sandbox: &Sandbox, path: &'static str, port: u16) -> Option<u16> {
    let addr = SocketAddr::from((NODE_GATEWAY, port));
    let response = sandbox.node.run(move || raw_http_get(addr, path)).ok()?.ok()?;
    status_of(&response)
}

/// The probe of `kind` (readinessProbe, livenessProbe, startupProbe): path and port.
fn probe_of(spec: &serde_json::Value, kind: &str) -> (&'static str, u16) {
    let get = &spec["containers"][0][kind]["httpGet"];
    let path: &'static str = get["path"].as_str().expect("probe path").to_string().leak();
    (path, get["port"].as_u64().expect("numeric probe port") as u16)
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemonset_pod_spec_runs_in_a_container_and_survives_a_restart() {
    let Some(image) = TestImage::build() else { return };
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    let listener = sandbox
        .node
        .run(|| TcpListener::bind((NODE_GATEWAY, 0)))
        .unwrap()
        .unwrap();
    let api = FakeApiServer::start(listener).unwrap();
    api.apply_yaml(&manifests::example());

    // What an operator sets: the API endpoint (params.env) and, for this
    // sandbox, a bpf root of its own (config.yaml).
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let mut rendered = Rendered::kustomize(std::path::Path::new(deploy)).expect("kubectl kustomize deploy/");
    rendered
        .find_mut("ConfigMap", "lb-agent-params")
        .expect("params ConfigMap")["data"]["API_SERVER"] = format!("http://{}", api.addr()).into();
    let config = rendered.find_mut("ConfigMap", "lb-agent").expect("config ConfigMap");
    let text = config["data"]["config.yaml"].as_str().unwrap().to_string();
    assert!(text.contains("bpfRoot: /sys/fs/bpf/lb-agent"), "{text}");
    config["data"]["config.yaml"] = text
        .replace(
            "bpfRoot: /sys/fs/bpf/lb-agent",
            &format!("bpfRoot: {}", sandbox.bpf_root.display()),
        )
        .into();
    let spec = rendered.pod_template("lb-agent").unwrap().clone();
    // Placement and rollout as an operator needs them on a fresh node.
    let ds = rendered.find("DaemonSet", "lb-agent").unwrap();
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    assert!(
        ds["spec"]["minReadySeconds"].as_u64() > Some(0),
        "a bad rollout stops at one node"
    );
    assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(spec["dnsPolicy"], "Default", "no dependency on cluster DNS");
    let container = &spec["containers"][0];
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "RUST_LOG"),
        "RUST_LOG would override --v"
    );
    assert_eq!(
        container["image"], "localhost/lb-agent:latest",
        "kustomize's image parameter"
    );
    let (ready_path, ready_port) = probe_of(&spec, "readinessProbe");
    let (live_path, live_port) = probe_of(&spec, "livenessProbe");

    // Without the host's cgroup mounted the agent would hook only its own
    // cgroup namespace (or none): it refuses to start and says what to do.
    {
        let pod = format!("lbt-{}-nocg", std::process::id());
        let mut run = PodRun::new(&rendered, &pod, NODE_NAME, &sandbox.node.path());
        run.image = Some(image.0.clone());
        run.without_volumes = vec!["host-cgroup".into()];
        let names = run.start(&spec).expect("container started");
        wait_until(
            "the agent refusing a namespaced cgroup",
            Duration::from_secs(20),
            || !run.running(&names[0]),
        );
        let logs = run.logs(&names[0]);
        assert!(
            logs.contains("Mount the host's /sys/fs/cgroup into the container"),
            "{logs}"
        );
    }

    // kube-proxy ran on this node: its rules are taken over (the init container).
    for restore in ["iptables-legacy-restore", "iptables-nft-restore"] {
        sandbox
            .node
            .iptables_restore(restore, &[], KUBE_PROXY_LEFTOVERS)
            .unwrap();
    }
    lb_tests::netns::run(sandbox.node.command("nft").args(["add", "table", "ip", "kube-proxy"])).unwrap();

    let pod = format!("lbt-{}-agent", std::process::id());
    cleanup::track_dir(std::env::temp_dir().join(format!("{pod}-volumes")));
    let mut run = PodRun::new(&rendered, &pod, NODE_NAME, &sandbox.node.path());
    run.image = Some(image.0.clone());
    let names = run.start(&spec).expect("the DaemonSet's container");
    let agent = names[0].clone();
    wait_until("readiness probe answering 200", Duration::from_secs(30), || {
        assert!(run.running(&agent), "agent container exited:\n{}", run.logs(&agent));
        probe(&sandbox, ready_path, ready_port) == Some(200)
    });
    assert_eq!(probe(&sandbox, live_path, live_port), Some(200), "liveness probe");
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let left = lb_tests::netns::run(&mut sandbox.node.command(save)).unwrap();
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(!left.contains("KUBE-"), "{save}: kube-proxy's rules left:\n{left}");
    }
    let tables = lb_tests::netns::run(sandbox.node.command("nft").args(["list", "tables"])).unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("kube-proxy"),
        "kube-proxy's nftables table left"
    );
    // --logging-format=json from the manifest: every line is a JSON object.
    let logs = run.logs(&agent);
    let first = logs.lines().next().expect("some log");
    let parsed: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(parsed["level"].is_string(), "{first}");

    // Pods and host processes (socket hooks on the host's cgroup root),
    // once the first sync is done (kube-proxy's /healthz is 200 from the start).
    let vip = SocketAddr::from((NGINX_VIP, 8080));
    wait_until("the first sync", Duration::from_secs(30), || {
        sandbox.client().run(move || http_get(vip).is_ok()).unwrap()
    });
    assert_eq!(
        tally(sandbox.client(), 30, vip, http_get).unwrap().len(),
        3,
        "client → ClusterIP"
    );
    let from_host = sandbox.node.run(move || http_get(vip)).unwrap();
    assert!(
        from_host.as_ref().is_ok_and(|pod| pod.starts_with("nginx-")),
        "host process → ClusterIP: {from_host:?}"
    );

    // Killing and restarting the container drops nothing: a held connection
    // and a stream of new ones keep working throughout.
    let mut held = sandbox.client().run(move || KeepAlive::connect(vip)).unwrap().unwrap();
    let held_pod = held.get().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        sandbox
            .client()
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(vip) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .unwrap()
    };
    image::podman(&["kill", &agent]).unwrap();
    wait_until("the killed container to stop", Duration::from_secs(10), || {
        !run.running(&agent)
    });
    assert_eq!(held.get().unwrap(), held_pod, "held connection while no agent runs");
    image::podman(&["start", &agent]).unwrap();
    wait_until("readiness after the restart", Duration::from_secs(30), || {
        probe(&sandbox, ready_path, ready_port) == Some(200)
    });
    assert_eq!(held.get().unwrap(), held_pod, "held connection after the restart");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 20, "only {ok} requests during the restart");
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during the restart",
        ok + failed
    );
    assert!(
        run.logs(&agent).contains("took over"),
        "the restarted agent took the pinned datapath over:\n{}",
        run.logs(&agent)
    );

    // Uninstall: the agent's DaemonSet goes (its datapath stays pinned and
    // serving), then deploy/uninstall/'s cleanup DaemonSet runs on the node.
    let links = pinned_link_ids(&sandbox.bpf_root);
    assert!(!links.is_empty(), "the agent pinned its links");
    drop(run);
    let uninstall = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/uninstall");
    let mut rendered =
        Rendered::kustomize(std::path::Path::new(uninstall)).expect("kubectl kustomize deploy/uninstall/");
    let cleanup_spec = {
        let ds = rendered
            .find_mut("DaemonSet", "lb-agent-cleanup")
            .expect("cleanup DaemonSet");
        let args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array_mut()
            .unwrap();
        let root = args
            .iter_mut()
            .find(|a| a.as_str().is_some_and(|a| a.starts_with("--bpf-root=")))
            .expect("--bpf-root in the cleanup args");
        *root = format!("--bpf-root={}", sandbox.bpf_root.display()).into();
        ds["spec"]["template"]["spec"].clone()
    };
    let pod = format!("lbt-{}-cleanup", std::process::id());
    let mut cleanup_run = PodRun::new(&rendered, &pod, NODE_NAME, &sandbox.node.path());
    cleanup_run.image = Some(image.0.clone());
    let names = cleanup_run
        .start(&cleanup_spec)
        .expect("the cleanup DaemonSet's container");
    wait_until("cleanup done", Duration::from_secs(20), || {
        cleanup_run.logs(&names[0]).contains("cleanup done")
    });
    assert!(cleanup_run.running(&names[0]), "the cleanup pod holds after its work");
    // Nothing of ours is left: no pin, no link, no program on the node's interfaces.
    assert!(
        !sandbox.bpf_root.exists(),
        "pins left in {}",
        sandbox.bpf_root.display()
    );
    for id in &links {
        let left = std::process::Command::new("bpftool")
            .args(["link", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(!left.status.success(), "link {id} still exists");
    }
    let net = lb_tests::netns::run(sandbox.node.command("bpftool").args(["net", "show"])).unwrap();
    let net = String::from_utf8_lossy(&net.stdout);
    assert!(!net.contains("lb_"), "programs still attached in the node:\n{net}");
    // kube-proxy, reinstalled, serves the Service with its iptables rules.
    let pods = manifests::example_pods();
    let kube_proxy_rules = format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-NGINX - [0:0]\n:KUBE-SEP-NGINXA - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-SERVICES -d {NGINX_VIP}/32 -p tcp -m tcp --dport 8080 -j KUBE-SVC-NGINX\n\
         -A KUBE-SVC-NGINX -j KUBE-SEP-NGINXA\n\
         -A KUBE-SEP-NGINXA -p tcp -m tcp -j DNAT --to-destination {}:80\nCOMMIT\n",
        pods[0].1
    );
    sandbox
        .node
        .iptables_restore("iptables-nft-restore", &[], &kube_proxy_rules)
        .unwrap();
    let answers = tally(sandbox.client(), 10, vip, http_get).expect("kube-proxy's rules serve the ClusterIP");
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        [&pods[0].0],
        "iptables, not the eBPF datapath, answered"
    );
}

/// Ids of the links pinned under `root`/links.
fn pinned_link_ids(root: &std::path::Path) -> Vec<u64> {
    std::fs::read_dir(root.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(e.path())
                .output()
                .ok()?;
            serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["id"].as_u64()
        })
        .collect()
}
