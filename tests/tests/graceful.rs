//! Graceful termination like kube-proxy, in the two-node netns cluster: a
//! rolling replacement of a service's three pods (each old pod first
//! terminating — ready=false, serving=true — then gone from the slice)
//! while clients hold keep-alive connections to every old pod, through the
//! ClusterIP (TC path, pod source kept) and through a masqueraded NodePort
//! (XDP path). The held connections keep working without a reset or a
//! stall until the end; new connections never reach a pod once it
//! terminates. UDP flows (kube-proxy's CleanStaleEntries) stay on their
//! pod while it serves and move as soon as it is gone, and a UDP flow
//! refused while its service had no endpoint reaches the first one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lb_tests::agent::Agent;
use lb_tests::client::{KeepAlive, http_get};
use lb_tests::cluster::{Cluster, XdpMode};
use lb_tests::netns::Netns;

const NODE1: [&str; 3] = ["old-a", "new-a", "client"];
const NODE2: [&str; 4] = ["old-b", "old-c", "new-b", "new-c"];
const OLD: [&str; 3] = ["old-a", "old-b", "old-c"];
const NEW: [&str; 3] = ["new-a", "new-b", "new-c"];
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 50);
const N1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// How long held connections must keep working after their pod is gone.
const HOLD: Duration = Duration::from_secs(5);
/// Held connections exchange a request this often.
const TICK: Duration = Duration::from_millis(200);
/// A gap between two answers on a held connection longer than this is a stall.
const STALL: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, PartialEq)]
enum State {
    Ready,
    /// ready=false, serving=true, terminating=true: draining.
    Terminating,
}

/// The service (ClusterIP, NodePort with eTP Cluster: masqueraded) and its
/// slice with these endpoints in these states; and a UDP service "late"
/// whose one endpoint is `new-a` once that pod exists.
fn manifest(c: &Cluster, endpoints: &[(&str, State)]) -> String {
    let late = match endpoints.iter().any(|e| e.0 == "new-a") {
        true => format!("{{addresses: [\"{}\"]}}", c.pod("new-a").ip),
        false => String::new(),
    };
    let late = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: late, namespace: net-test}}\nspec:\n  clusterIP: 198.19.0.51\n  ports: [{{name: dns, protocol: UDP, port: 53, targetPort: 5353}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: late-x, namespace: net-test, labels: {{kubernetes.io/service-name: late}}}}\naddressType: IPv4\nports: [{{name: dns, protocol: UDP, port: 5353}}]\nendpoints: [{late}]\n---\n"
    );
    late + &roll(c, endpoints)
}

fn roll(c: &Cluster, endpoints: &[(&str, State)]) -> String {
    let mut y = "apiVersion: v1\nkind: Service\nmetadata: {name: roll, namespace: net-test}\nspec:\n  type: NodePort\n  clusterIP: 198.19.0.50\n  ports:\n  - {name: http, protocol: TCP, port: 8080, targetPort: 80, nodePort: 30150}\n  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30153}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: roll-abcde\n  namespace: net-test\n  labels: {kubernetes.io/service-name: roll}\naddressType: IPv4\nports:\n- {name: http, protocol: TCP, port: 80}\n- {name: dns, protocol: UDP, port: 5353}\nendpoints:\n".to_string();
    for &(pod, state) in endpoints {
        let (_, ip, node) = &c.endpoints(&[pod])[0];
        let conditions = match state {
            State::Ready => "{ready: true, serving: true, terminating: false}",
            State::Terminating => "{ready: false, serving: true, terminating: true}",
        };
        y += &format!(
            "- addresses: [\"{ip}\"]\n  conditions: {conditions}\n  nodeName: {node}\n  targetRef: {{kind: Pod, namespace: net-test, name: {pod}}}\n"
        );
    }
    y
}

/// Writes the manifest and waits until both agents have synced it.
fn apply(c: &Cluster, agents: &[Agent], endpoints: &[(&str, State)]) {
    let marks: Vec<usize> = agents.iter().map(Agent::log_position).collect();
    c.write_manifest("roll.yaml", &manifest(c, endpoints)).unwrap();
    for (agent, from) in agents.iter().zip(marks) {
        agent.wait_manifest_synced(from, Duration::from_secs(10)).unwrap();
    }
}

/// Keep-alive connections from `ns` to `target` until one is held to each
/// of `pods` (the service picks at random).
fn hold_one_per_pod(ns: &Netns, target: SocketAddr, pods: &'static [&'static str]) -> BTreeMap<String, KeepAlive> {
    ns.run(move || {
        let mut held = BTreeMap::new();
        for _ in 0..200 {
            if held.len() == pods.len() {
                break;
            }
            let mut conn = KeepAlive::connect(target).expect("connecting");
            let pod = conn.get().expect("first request");
            held.entry(pod).or_insert(conn);
        }
        assert_eq!(
            held.len(),
            pods.len(),
            "{target}: no connection to some pod: {:?}",
            held.keys()
        );
        held
    })
    .unwrap()
}

/// What a held connection went through.
struct Ticked {
    requests: usize,
    failures: Vec<String>,
    longest_gap: Duration,
}

/// Sends a request every TICK on `conn` until `stop`; every answer must
/// come from `pod`.
fn tick(name: String, pod: String, mut conn: KeepAlive, stop: Arc<AtomicBool>) -> JoinHandle<(String, Ticked)> {
    std::thread::spawn(move || {
        let mut t = Ticked {
            requests: 0,
            failures: Vec::new(),
            longest_gap: Duration::ZERO,
        };
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match conn.get() {
                Ok(answer) if answer == pod => {
                    t.requests += 1;
                    t.longest_gap = t.longest_gap.max(last.elapsed());
                    last = Instant::now();
                }
                Ok(other) => t.failures.push(format!("answered by {other}")),
                Err(e) => {
                    t.failures.push(format!("{e:#}"));
                    break;
                }
            }
            std::thread::sleep(TICK);
        }
        (name, t)
    })
}

/// `n` new connections from `ns` to `target`: the pods that answered.
fn new_connections(ns: &Netns, target: SocketAddr, n: usize) -> BTreeSet<String> {
    ns.run(move || {
        (0..n)
            .map(|i| http_get(target).unwrap_or_else(|e| panic!("new connection {i} to {target}: {e:#}")))
            .collect()
    })
    .unwrap()
}

/// A connected UDP socket: one flow, one conntrack entry.
struct UdpFlow(UdpSocket);

impl UdpFlow {
    fn ask(&self) -> String {
        self.0.send(b"who are you").expect("UDP send");
        let mut buf = [0u8; 256];
        let n = self.0.recv(&mut buf).expect("UDP answer");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    }
}

/// UDP flows from `ns` to `target` until one sticks to each of `pods`.
fn udp_one_per_pod(ns: &Netns, target: SocketAddr, pods: &'static [&'static str]) -> BTreeMap<String, UdpFlow> {
    ns.run(move || {
        let mut flows = BTreeMap::new();
        for _ in 0..200 {
            if flows.len() == pods.len() {
                break;
            }
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket.connect(target).unwrap();
            let flow = UdpFlow(socket);
            let pod = flow.ask();
            flows.entry(pod).or_insert(flow);
        }
        assert_eq!(flows.len(), pods.len(), "{target}: no UDP flow to some pod");
        flows
    })
    .unwrap()
}

#[test]
fn rolling_update_keeps_established_connections_and_new_ones_avoid_terminating_pods() {
    let mut cluster = Cluster::new([&NODE1, &NODE2]).expect("cluster");
    cluster.enable_xdp(XdpMode::Native).expect("XDP wiring");
    let ready = |pods: &[&'static str]| pods.iter().map(|&p| (p, State::Ready)).collect::<Vec<_>>();
    cluster
        .write_manifest("roll.yaml", &manifest(&cluster, &ready(&OLD)))
        .unwrap();
    let agents = cluster.start_agents(true).expect("agents");
    let client = &cluster.pod("client").ns;
    let external = &cluster.externals[0].1;
    let cluster_ip = SocketAddr::from((VIP, 8080));
    let node_port = SocketAddr::from((N1, 30150));

    // Held connections to every old pod: from a pod through the ClusterIP,
    // from outside through node-1's NodePort (masqueraded, XDP).
    let stop = Arc::new(AtomicBool::new(false));
    let mut tickers = Vec::new();
    for (path, ns, target) in [("ClusterIP", client, cluster_ip), ("NodePort", external, node_port)] {
        for (pod, conn) in hold_one_per_pod(ns, target, &OLD) {
            tickers.push(tick(format!("{path} → {pod}"), pod, conn, stop.clone()));
        }
    }
    let mut udp = udp_one_per_pod(client, SocketAddr::from((VIP, 53)), &OLD);
    // A UDP flow to a service without endpoints is refused (REJECT)...
    let late = client
        .run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket.connect((Ipv4Addr::new(198, 19, 0, 51), 53)).unwrap();
            socket.send(b"anyone?").unwrap();
            let refused = socket.recv(&mut [0u8; 64]).map_err(|e| e.kind());
            assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "no endpoint yet");
            UdpFlow(socket)
        })
        .unwrap();

    // Roll: for each old pod, its replacement becomes ready and the old
    // one terminates; then the old one leaves the slice.
    let mut serving: Vec<(&str, State)> = ready(&OLD);
    let mut retired: Vec<&str> = Vec::new();
    let mut last_removal = Instant::now();
    for (old, new) in OLD.into_iter().zip(NEW) {
        serving.push((new, State::Ready));
        for e in serving.iter_mut().filter(|e| e.0 == old) {
            e.1 = State::Terminating;
        }
        apply(&cluster, &agents, &serving);
        if new == "new-a" {
            // ...and the same flow reaches the service's first endpoint as
            // soon as it has one: nothing of the refused flow was kept
            // (kube-proxy clears such black-holed UDP entries).
            assert_eq!(late.ask(), "new-a", "the first endpoint answers the old flow");
        }
        retired.push(old);
        for (ns, target) in [(client, cluster_ip), (external, node_port)] {
            let answered = new_connections(ns, target, 30);
            assert!(
                retired.iter().all(|r| !answered.contains(*r)),
                "{old} terminating: new connections to {target} reached {answered:?}"
            );
        }
        let flow = udp.get(old).expect("UDP flow of the old pod");
        assert_eq!(flow.ask(), old, "a UDP flow stays on its terminating (serving) pod");

        serving.retain(|e| e.0 != old);
        apply(&cluster, &agents, &serving);
        last_removal = Instant::now();
        for (ns, target) in [(client, cluster_ip), (external, node_port)] {
            let answered = new_connections(ns, target, 30);
            assert!(
                retired.iter().all(|r| !answered.contains(*r)),
                "{old} removed: new connections to {target} reached {answered:?}"
            );
        }
        let flow = udp.remove(old).unwrap();
        let moved = flow.ask();
        assert!(
            !retired.contains(&moved.as_str()),
            "the UDP flow of removed {old} went to {moved}, not a serving pod"
        );
    }

    // The held connections outlive their pods' removal by HOLD.
    while last_removal.elapsed() < HOLD {
        std::thread::sleep(TICK);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tickers {
        let (name, t) = t.join().unwrap();
        assert!(t.failures.is_empty(), "{name}: {:?}", t.failures);
        assert!(t.longest_gap < STALL, "{name}: stalled for {:?}", t.longest_gap);
        // At least HOLD of steady traffic.
        assert!(
            t.requests as u128 >= HOLD.as_millis() / TICK.as_millis(),
            "{name}: only {} requests",
            t.requests
        );
    }
    // After the roll, new connections spread over the new pods only.
    for (ns, target) in [(client, cluster_ip), (external, node_port)] {
        let answered = new_connections(ns, target, 60);
        let want: BTreeSet<String> = NEW.iter().map(|p| p.to_string()).collect();
        assert_eq!(answered, want, "new connections to {target} after the roll");
    }
    assert!(
        agents[0].counter("event", "xdp_forwarded").unwrap() > 0,
        "the NodePort flows went through XDP"
    );
}
