//! NodePort, load-balancer and external IPs, masquerade and traffic policies
//! on a two-node netns cluster, in kube-proxy's packetFlowTest form: from a
//! source, to a destination → which pods answer and which source address
//! they see (the client, or a node address when masqueraded) | REJECT | DROP.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_tests::agent::Agent;
use lb_tests::client::{http_get_seen, udp_query};
use lb_tests::cluster::{Cluster, XdpMode};
use lb_tests::netns::Netns;

const NODE1: [&str; 1] = ["web-1a"];
const NODE2: [&str; 1] = ["web-2a"];

/// Service + EndpointSlice YAML. `ports`: (name, protocol, port, targetPort,
/// nodePort); `endpoints`: (pod, IP, node), all of one family.
fn service<A: Into<IpAddr> + Copy>(
    name: &str,
    spec: &str,
    status: &str,
    ports: &[(&str, &str, u16, u16, Option<u16>)],
    endpoints: &[(String, A, String)],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: net-test}}\nspec:\n{spec}  ports:\n"
    );
    for (pname, proto, port, target, node_port) in ports {
        y += &format!("  - {{name: \"{pname}\", protocol: {proto}, port: {port}, targetPort: {target}");
        if let Some(np) = node_port {
            y += &format!(", nodePort: {np}");
        }
        y += "}\n";
    }
    y += status;
    y + &slice(name, "abcde", ports, endpoints)
}

/// One EndpointSlice of service `name` (a dual-stack service has one per family).
fn slice<A: Into<IpAddr> + Copy>(
    name: &str,
    suffix: &str,
    ports: &[(&str, &str, u16, u16, Option<u16>)],
    endpoints: &[(String, A, String)],
) -> String {
    let family = match endpoints.first().map(|e| e.1.into()) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let mut y = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{suffix}\n  namespace: net-test\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n"
    );
    for (pname, proto, _, target, _) in ports {
        y += &format!("- {{name: \"{pname}\", protocol: {proto}, port: {target}}}\n");
    }
    y += if endpoints.is_empty() {
        "endpoints: []\n"
    } else {
        "endpoints:\n"
    };
    for (pod, ip, node) in endpoints {
        let ip: IpAddr = (*ip).into();
        y += &format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n  targetRef: {{kind: Pod, namespace: net-test, name: {pod}}}\n"
        );
    }
    y
}

/// `yaml` with the endpoint of `pod` given these conditions instead of
/// `{ready: true}` (kube-proxy's terminating-endpoint cases).
fn with_conditions(yaml: String, pod: &str, conditions: &str) -> String {
    let target = format!("name: {pod}}}");
    let mut lines: Vec<String> = yaml.lines().map(String::from).collect();
    let at = lines
        .iter()
        .position(|l| l.contains("targetRef:") && l.ends_with(&target))
        .unwrap_or_else(|| panic!("no endpoint of {pod}"));
    let cond = (0..at)
        .rev()
        .find(|&i| lines[i].trim_start().starts_with("conditions:"))
        .expect("conditions line");
    lines[cond] = format!("  conditions: {conditions}");
    lines.join("\n") + "\n"
}

const TERMINATING_SERVING: &str = "{ready: false, serving: true, terminating: true}";
const TERMINATING_GONE: &str = "{ready: false, serving: false, terminating: true}";

fn manifests(c: &Cluster) -> String {
    let both = c.endpoints(&["web-1a", "web-2a"]);
    let one = c.endpoints(&["web-1a"]);
    let http = |np: Option<u16>| ("http", "TCP", 8080, 80, np);
    [
        service("web", "  type: NodePort\n  clusterIP: 198.19.0.10\n", "", &[http(Some(30080)), ("dns", "UDP", 53, 5353, Some(30053))], &both),
        service(
            "web-local",
            "  type: LoadBalancer\n  clusterIP: 198.19.0.11\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            "",
            &[http(Some(30081))],
            &one,
        ),
        service("self", "  clusterIP: 198.19.0.20\n", "", &[http(None)], &one),
        service(
            "web-lb",
            "  type: LoadBalancer\n  clusterIP: 198.19.0.12\n  externalIPs: [198.19.101.1]\n  loadBalancerSourceRanges: [198.18.0.100/32]\n",
            "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.19.100.1\n",
            &[("http", "TCP", 80, 80, Some(30082))],
            &both,
        ),
        service(
            "empty",
            "  type: NodePort\n  clusterIP: 198.19.0.13\n",
            "",
            &[http(Some(30090))],
            &[] as &[(String, Ipv4Addr, String)],
        ),
        service("sticky", "  clusterIP: 198.19.0.30\n  sessionAffinity: ClientIP\n", "", &[http(None)], &both),
        // kube-proxy's terminating-endpoint flows: web-1a terminating (still serving).
        with_conditions(
            service(
                "drain-local",
                "  type: NodePort\n  clusterIP: 198.19.0.16\n  externalTrafficPolicy: Local\n",
                "",
                &[http(Some(30084))],
                &both,
            ),
            "web-1a",
            TERMINATING_SERVING,
        ),
        with_conditions(
            with_conditions(
                service("drain-all", "  clusterIP: 198.19.0.17\n", "", &[http(None)], &both),
                "web-1a",
                TERMINATING_SERVING,
            ),
            "web-2a",
            TERMINATING_GONE,
        ),
        service(
            "web-lb-local",
            "  type: LoadBalancer\n  clusterIP: 198.19.0.14\n  externalTrafficPolicy: Local\n",
            "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.19.100.2\n",
            &[("http", "TCP", 80, 80, Some(30083))],
            &one,
        ),
        // Source ranges listing node-1 (and ext-0), not ext-1.
        service(
            "web-lb-node",
            "  type: LoadBalancer\n  clusterIP: 198.19.0.15\n  loadBalancerSourceRanges: [198.18.0.100/32, 198.18.0.11/32]\n",
            "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.19.100.3\n",
            &[("http", "TCP", 80, 80, Some(30084))],
            &both,
        ),
    ]
    .join("---\n")
}

/// Who a packet flow's backend saw as its client.
#[derive(Debug, Clone, Copy)]
enum Seen {
    /// The real client (no masquerade).
    Client,
    /// An address of node `i` (masqueraded there).
    Node(usize),
}

#[derive(Debug)]
enum Want {
    Pods(&'static [&'static str], Seen),
    /// Refused at once (ICMP port unreachable from the datapath).
    Refused,
    /// Refused by the SYN's retransmission: a TCP/IPv6 socket drops an
    /// ICMPv6 error that arrives while connect() still holds it (the pod's
    /// veth delivers the datapath's answer in the same softirq; see
    /// TcpExtLockDroppedIcmps), so the answer to the retry (1 s) counts.
    RefusedOnRetry,
    /// No answer at all (dropped).
    NoAnswer,
    /// connect() fails at once with EPERM: a host socket the datapath
    /// may not translate (a drop, as far as a socket can tell).
    Denied,
}

#[derive(Debug, Clone, Copy)]
enum From {
    External(usize),
    Pod(&'static str),
    /// A process in node i's own namespace (hostNetwork).
    Host(usize),
    /// The same clients, from their IPv6 addresses.
    External6(usize),
    Pod6(&'static str),
    Host6(usize),
}

struct Case {
    name: &'static str,
    from: From,
    to: SocketAddr,
    want: Want,
}

fn to(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn source_ns(c: &Cluster, from: From) -> (&Netns, IpAddr) {
    match from {
        From::External(i) => (&c.externals[i].1, c.externals[i].0.into()),
        From::Pod(name) => (&c.pod(name).ns, c.pod(name).ip.into()),
        From::Host(i) => (&c.nodes[i].ns, c.nodes[i].addr.into()),
        From::External6(i) => (&c.externals[i].1, c.externals6[i].into()),
        From::Pod6(name) => (&c.pod(name).ns, c.pod(name).ip6.into()),
        From::Host6(i) => (&c.nodes[i].ns, c.nodes[i].addr6.into()),
    }
}

fn node_addrs(c: &Cluster, i: usize) -> Vec<String> {
    let n = &c.nodes[i];
    vec![
        n.addr.to_string(),
        n.pod_gateway.to_string(),
        n.addr6.to_string(),
        n.pod_gateway6.to_string(),
    ]
}

fn check(c: &Cluster, case: &Case) {
    let (ns, client_ip) = source_ns(c, case.from);
    let target = case.to;
    match &case.want {
        Want::Pods(pods, seen) => {
            let answers = ns
                .run(move || (0..20).map(|_| http_get_seen(target)).collect::<Vec<_>>())
                .unwrap();
            let mut got_pods = BTreeSet::new();
            for a in answers {
                let (pod, peer) = a.unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
                let ok = match seen {
                    Seen::Client => peer == client_ip.to_string(),
                    Seen::Node(i) => node_addrs(c, *i).contains(&peer),
                };
                assert!(ok, "{}: backend saw {peer}, wanted {seen:?}", case.name);
                got_pods.insert(pod);
            }
            let want: BTreeSet<String> = pods.iter().map(|p| p.to_string()).collect();
            assert_eq!(got_pods, want, "{}: answering pods", case.name);
        }
        Want::Refused | Want::RefusedOnRetry => {
            let (result, took) = ns
                .run(move || {
                    let started = Instant::now();
                    let r = TcpStream::connect_timeout(&target, Duration::from_secs(2));
                    (r.map(|_| ()).map_err(|e| e.kind()), started.elapsed())
                })
                .unwrap();
            assert_eq!(result, Err(ErrorKind::ConnectionRefused), "{}", case.name);
            let limit = match case.want {
                Want::Refused => Duration::from_millis(100),
                _ => Duration::from_millis(1500),
            };
            assert!(took < limit, "{}: refused only after {took:?}", case.name);
        }
        Want::Denied => {
            let result = ns
                .run(move || TcpStream::connect_timeout(&target, Duration::from_secs(1)).map(|_| ()))
                .unwrap();
            let kind = result.as_ref().map_err(|e| e.kind());
            assert_eq!(kind, Err(ErrorKind::PermissionDenied), "{}", case.name);
        }
        Want::NoAnswer => {
            let result = ns
                .run(move || TcpStream::connect_timeout(&target, Duration::from_millis(300)).map(|_| ()))
                .unwrap();
            let kind = result.as_ref().map_err(|e| e.kind());
            assert!(
                matches!(kind, Err(ErrorKind::TimedOut | ErrorKind::WouldBlock)),
                "{}: expected no answer, got {kind:?}",
                case.name
            );
        }
    }
}

const N1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const N2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

/// The cluster with agents running the XDP fast path in `xdp` mode.
fn cluster_with_agents(xdp: XdpMode) -> (Cluster, Vec<Agent>) {
    let mut cluster = Cluster::new([&NODE1, &NODE2]).expect("cluster");
    if xdp != XdpMode::Off {
        cluster.enable_xdp(xdp).expect("preparing the veths for XDP");
    }
    cluster.write_manifest("services.yaml", &manifests(&cluster)).unwrap();
    let agents = cluster.start_agents(true).expect("agents");
    (cluster, agents)
}

/// With XDP on, it must have carried traffic on these agents' nodes (else
/// a test passing "with XDP" would only show the TC path again).
fn assert_xdp_used(xdp: XdpMode, agents: &[Agent]) {
    for (i, agent) in agents.iter().enumerate() {
        let forwarded = agent.counter("event", "xdp_forwarded").unwrap();
        match xdp {
            XdpMode::Off => assert_eq!(forwarded, 0, "node {i}: XDP is off"),
            _ => assert!(forwarded > 0, "node {i}: XDP ({xdp:?}) forwarded nothing"),
        }
    }
}

#[test]
fn packet_flows_through_nodeports_load_balancers_and_cluster_ips() {
    packet_flows(XdpMode::Off);
}

#[test]
fn packet_flows_with_xdp_native() {
    packet_flows(XdpMode::Native);
}

#[test]
fn packet_flows_with_xdp_generic() {
    packet_flows(XdpMode::Generic);
}

fn packet_flows(xdp: XdpMode) {
    let (cluster, agents) = cluster_with_agents(xdp);
    let both: &'static [&'static str] = &["web-1a", "web-2a"];
    let cases = [
        Case {
            name: "external → node-1 NodePort (eTP Cluster): both nodes' pods, masqueraded by node-1",
            from: From::External(0),
            to: to(N1, 30080),
            want: Want::Pods(both, Seen::Node(0)),
        },
        Case {
            name: "external → node-2 NodePort (eTP Cluster): masqueraded by node-2",
            from: From::External(0),
            to: to(N2, 30080),
            want: Want::Pods(both, Seen::Node(1)),
        },
        Case {
            name: "external → node-1 NodePort (eTP Local): local pod, client address kept",
            from: From::External(0),
            to: to(N1, 30081),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "external → node-2 NodePort (eTP Local) without local endpoint: dropped",
            from: From::External(0),
            to: to(N2, 30081),
            want: Want::NoAnswer,
        },
        Case {
            name: "pod on node-2 → node-2 NodePort (eTP Local, no local endpoint): node-1's pod, pod address kept",
            from: From::Pod("web-2a"),
            to: to(N2, 30081),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "host process on node-2 → its NodePort (eTP Local, no local endpoint): node-1's pod",
            from: From::Host(1),
            to: to(N2, 30081),
            want: Want::Pods(&["web-1a"], Seen::Node(1)),
        },
        Case {
            name: "pod on node-2 → eTP Local LB IP: node-1's pod, pod address kept",
            from: From::Pod("web-2a"),
            to: to(Ipv4Addr::new(198, 19, 100, 2), 80),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "host process on node-2 → eTP Local LB IP: node-1's pod",
            from: From::Host(1),
            to: to(Ipv4Addr::new(198, 19, 100, 2), 80),
            want: Want::Pods(&["web-1a"], Seen::Node(1)),
        },
        Case {
            name: "external → eTP Local LB IP (routed to node-1): local pod, client address kept",
            from: From::External(0),
            to: to(Ipv4Addr::new(198, 19, 100, 2), 80),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "host process → LB IP whose source ranges list the node (allowFromNode)",
            from: From::Host(0),
            to: to(Ipv4Addr::new(198, 19, 100, 3), 80),
            want: Want::Pods(both, Seen::Node(0)),
        },
        Case {
            name: "external → that LB IP from outside its source ranges: dropped",
            from: From::External(1),
            to: to(Ipv4Addr::new(198, 19, 100, 3), 80),
            want: Want::NoAnswer,
        },
        Case {
            name: "host process → LB IP whose source ranges leave the node out: not translated (kube-proxy drops)",
            from: From::Host(0),
            to: to(Ipv4Addr::new(198, 19, 100, 1), 80),
            want: Want::Denied,
        },
        Case {
            name: "host process → ClusterIP without endpoints: ECONNREFUSED at once (REJECT)",
            from: From::Host(0),
            to: to(Ipv4Addr::new(198, 19, 0, 13), 8080),
            want: Want::Refused,
        },
        Case {
            name: "pod → ClusterIP (backend on the other node): pod source kept",
            from: From::Pod("web-2a"),
            to: to(Ipv4Addr::new(198, 19, 0, 20), 8080),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "hairpin: pod → its own service → itself, masqueraded",
            from: From::Pod("web-1a"),
            to: to(Ipv4Addr::new(198, 19, 0, 20), 8080),
            want: Want::Pods(&["web-1a"], Seen::Node(0)),
        },
        Case {
            name: "external → load-balancer IP from an allowed source",
            from: From::External(0),
            to: to(Ipv4Addr::new(198, 19, 100, 1), 80),
            want: Want::Pods(both, Seen::Node(0)),
        },
        Case {
            name: "external → load-balancer IP from outside the source ranges: dropped",
            from: From::External(1),
            to: to(Ipv4Addr::new(198, 19, 100, 1), 80),
            want: Want::NoAnswer,
        },
        Case {
            name: "external → externalIP",
            from: From::External(1),
            to: to(Ipv4Addr::new(198, 19, 101, 1), 80),
            want: Want::Pods(both, Seen::Node(0)),
        },
        Case {
            name: "NodePort of a service without endpoints: refused at once",
            from: From::External(0),
            to: to(N1, 30090),
            want: Want::Refused,
        },
        Case {
            name: "host process → ClusterIP (socket hooks)",
            from: From::Host(1),
            to: to(Ipv4Addr::new(198, 19, 0, 10), 8080),
            want: Want::Pods(both, Seen::Node(1)),
        },
        Case {
            name: "host process → 127.0.0.1:NodePort",
            from: From::Host(0),
            to: to(Ipv4Addr::LOCALHOST, 30080),
            want: Want::Pods(both, Seen::Node(0)),
        },
        Case {
            name: "host process → its node's NodePort",
            from: From::Host(0),
            to: to(N1, 30080),
            want: Want::Pods(both, Seen::Node(0)),
        },
        Case {
            name: "eTP Local, the local endpoint terminating (serving): still used for external traffic",
            from: From::External(0),
            to: to(N1, 30084),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "eTP Local on the node with a ready endpoint: only it",
            from: From::External(0),
            to: to(N2, 30084),
            want: Want::Pods(&["web-2a"], Seen::Client),
        },
        Case {
            name: "eTP Local in-cluster: ready endpoints only, the terminating one avoided",
            from: From::Pod("web-2a"),
            to: to(Ipv4Addr::new(198, 19, 0, 16), 8080),
            want: Want::Pods(&["web-2a"], Seen::Node(1)),
        },
        Case {
            name: "no ready endpoint: serving terminating ones are used, non-serving ones never",
            from: From::Pod("web-2a"),
            to: to(Ipv4Addr::new(198, 19, 0, 17), 8080),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "ClusterIP on a port the service lacks: refused",
            from: From::Pod("web-2a"),
            to: to(Ipv4Addr::new(198, 19, 0, 10), 9999),
            want: Want::Refused,
        },
    ];
    for case in &cases {
        check(&cluster, case);
    }
    // `lb-agent services` shows node-2's eTP Local NodePort twice: empty
    // for external sources, node-1's pod for in-cluster ones.
    let services = agents[1].services().unwrap();
    let web_1a = format!("{}:80", cluster.pod("web-1a").ip);
    assert_eq!(services.get(&format!("{N2}:30081/TCP")), Some(&vec![]), "{services:?}");
    assert_eq!(
        services.get(&format!("{N2}:30081/TCP (internal)")),
        Some(&vec![web_1a]),
        "{services:?}"
    );
    let rules = cluster.nat_rules().unwrap();
    assert!(rules.is_empty(), "NAT rules in a node:\n{rules}");
    assert_xdp_used(xdp, &agents);
}

#[test]
fn udp_nodeport_affinity_health_checks_and_a_thousand_parallel_connections() {
    udp_affinity_health_and_load(XdpMode::Off);
}

#[test]
fn udp_affinity_health_and_load_with_xdp_native() {
    udp_affinity_health_and_load(XdpMode::Native);
}

fn udp_affinity_health_and_load(xdp: XdpMode) {
    let (cluster, agents) = cluster_with_agents(xdp);
    let (ext, _) = (&cluster.externals[0].1, cluster.externals[0].0);

    // UDP through a NodePort.
    let answers = ext
        .run(|| {
            (0..20)
                .map(|_| udp_query(SocketAddr::from((N1, 30053))))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let pods: BTreeSet<String> = answers.into_iter().map(|a| a.expect("UDP answer")).collect();
    assert_eq!(pods, BTreeSet::from(["web-1a".to_string(), "web-2a".to_string()]));

    // UDP from a host process (sendmsg/recvmsg socket hooks).
    let node1 = &cluster.nodes[0].ns;
    let answer = node1
        .run(|| udp_query(SocketAddr::from((Ipv4Addr::new(198, 19, 0, 10), 53))))
        .unwrap();
    assert!(
        answer.is_ok_and(|pod| pod.starts_with("web-")),
        "host UDP to a ClusterIP"
    );

    // ClientIP affinity: 100 connections, one pod.
    let sticky = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 30), 8080));
    let pods: BTreeSet<String> = cluster
        .pod("web-2a")
        .ns
        .run(move || {
            (0..100)
                .map(|_| http_get_seen(sticky).expect("sticky request").0)
                .collect()
        })
        .unwrap();
    assert_eq!(pods.len(), 1, "affinity broken: {pods:?}");

    // healthCheckNodePort: 200 where the eTP Local service has a local endpoint, 503 elsewhere.
    for (node, code, local) in [(N1, "200", 1), (N2, "503", 0)] {
        let response = ext
            .run(move || lb_tests::client::raw_http_get(SocketAddr::from((node, 32000)), "/healthz"))
            .unwrap()
            .expect("health check");
        let status = response.split_whitespace().nth(1).unwrap_or_default();
        assert_eq!(status, code, "{node}: {response}");
        assert!(
            response.contains(&format!("\"localEndpoints\": {local}")),
            "{node}: {response}"
        );
        assert!(response.contains("\"name\": \"web-local\""), "{node}: {response}");
    }

    // 1,000 short connections in parallel through a masquerading NodePort.
    let target = SocketAddr::from((N1, 30080));
    let failures = ext
        .run(move || {
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..50)
                    .map(|_| s.spawn(move || (0..20).filter(|_| http_get_seen(target).is_err()).count()))
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).sum::<usize>()
            })
        })
        .unwrap();
    assert_eq!(failures, 0, "{failures} of 1000 connections failed");
    // External traffic above went to node 1's NodePorts only.
    assert_xdp_used(xdp, &agents[..1]);
}

#[test]
fn xdp_survives_an_agent_restart_and_goes_away_when_turned_off() {
    let (mut cluster, mut agents) = cluster_with_agents(XdpMode::Native);
    let target = SocketAddr::from((N1, 30081));
    let ext = &cluster.externals[0].1;
    let get = move || http_get_seen(target).map(|(pod, _)| pod);
    assert_eq!(ext.run(get).unwrap().unwrap(), "web-1a");

    // The agent exits: the pinned XDP link keeps serving.
    let agent = agents.remove(0);
    agent.kill().unwrap();
    assert!(cluster.xdp_attached(0).unwrap(), "XDP detached with the agent");
    assert_eq!(ext.run(get).unwrap().unwrap(), "web-1a", "served while no agent runs");

    // A new agent takes the link over; still XDP.
    let agent = cluster.start_agent(0, true).unwrap();
    let forwarded = agent.counter("event", "xdp_forwarded").unwrap();
    assert_eq!(ext.run(get).unwrap().unwrap(), "web-1a");
    assert!(
        agent.counter("event", "xdp_forwarded").unwrap() > forwarded,
        "XDP after the restart"
    );
    assert!(agent.log().contains("took over the pinned XDP link"), "link taken over");

    // Restarted with XDP off: the program goes away, TC serves alone.
    agent.kill().unwrap();
    cluster.enable_xdp(XdpMode::Off).unwrap();
    let ext = &cluster.externals[0].1;
    let agent = cluster.start_agent(0, true).unwrap();
    // Unpinning drops the last reference; the kernel releases the link
    // asynchronously, so wait for that (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.xdp_attached(0).unwrap() {
        assert!(Instant::now() < deadline, "XDP still attached with --xdp-mode off");
        std::thread::sleep(Duration::from_millis(20));
    }
    let forwarded = agent.counter("event", "xdp_forwarded").unwrap();
    assert_eq!(ext.run(get).unwrap().unwrap(), "web-1a");
    assert_eq!(agent.counter("event", "xdp_forwarded").unwrap(), forwarded);
}

/// IPv6 and dual-stack services, in the same packet-flow form: ClusterIP,
/// NodePort with masquerade and with eTP Local, hairpin, and one dual-stack
/// service reached on both of its cluster IPs with the same backends.
#[test]
fn ipv6_and_dual_stack_services() {
    ipv6_and_dual_stack(XdpMode::Off);
}

#[test]
fn ipv6_and_dual_stack_services_with_xdp_native() {
    ipv6_and_dual_stack(XdpMode::Native);
}

fn ipv6_and_dual_stack(xdp: XdpMode) {
    let mut cluster = Cluster::new([&NODE1, &NODE2]).expect("cluster");
    if xdp != XdpMode::Off {
        cluster.enable_xdp(xdp).expect("preparing the veths for XDP");
    }
    let both6 = cluster.endpoints6(&["web-1a", "web-2a"]);
    let one6 = cluster.endpoints6(&["web-1a"]);
    let http = |np: Option<u16>| ("http", "TCP", 8080, 80, np);
    let v6_only = "  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n";
    let docs = [
        service(
            "web6",
            &format!("  type: NodePort\n  clusterIP: fd00:198:19::10\n{v6_only}"),
            "",
            &[http(Some(30180))],
            &both6,
        ),
        service(
            "web6-local",
            &format!("  type: NodePort\n  clusterIP: fd00:198:19::11\n  externalTrafficPolicy: Local\n{v6_only}"),
            "",
            &[http(Some(30181))],
            &one6,
        ),
        service(
            "self6",
            &format!("  clusterIP: fd00:198:19::20\n{v6_only}"),
            "",
            &[http(None)],
            &one6,
        ),
        service(
            "empty6",
            &format!("  clusterIP: fd00:198:19::30\n{v6_only}"),
            "",
            &[http(None)],
            &[] as &[(String, Ipv6Addr, String)],
        ),
        service(
            "dual",
            "  clusterIP: 198.19.0.40\n  clusterIPs: [198.19.0.40, fd00:198:19::40]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n",
            "",
            &[http(None)],
            &cluster.endpoints(&["web-1a"]),
        ) + &slice("dual", "v6xyz", &[http(None)], &one6),
    ];
    cluster.write_manifest("services.yaml", &docs.join("---\n")).unwrap();
    let agents = cluster.start_agents(true).expect("agents");
    let both: &'static [&'static str] = &["web-1a", "web-2a"];
    let n1_6 = cluster.nodes[0].addr6;
    let n2_6 = cluster.nodes[1].addr6;
    let vip6 = |host: u16| Ipv6Addr::new(0xfd00, 0x198, 0x19, 0, 0, 0, 0, host);
    let cases = [
        Case {
            name: "IPv6 pod → IPv6 ClusterIP (backend on the other node): pod source kept",
            from: From::Pod6("web-2a"),
            to: to(vip6(0x20), 8080),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "IPv6 external → node-1 IPv6 NodePort (eTP Cluster): masqueraded as node-1",
            from: From::External6(0),
            to: to(n1_6, 30180),
            want: Want::Pods(both, Seen::Node(0)),
        },
        Case {
            name: "IPv6 external → node-1 IPv6 NodePort (eTP Local): client address kept",
            from: From::External6(0),
            to: to(n1_6, 30181),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "IPv6 pod on node-2 → node-2 IPv6 NodePort (eTP Local, no local endpoint): node-1's pod, pod address kept",
            from: From::Pod6("web-2a"),
            to: to(n2_6, 30181),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "IPv6 host process on node-2 → its IPv6 NodePort (eTP Local): node-1's pod",
            from: From::Host6(1),
            to: to(n2_6, 30181),
            want: Want::Pods(&["web-1a"], Seen::Node(1)),
        },
        Case {
            name: "IPv6 external → node-2 IPv6 NodePort (eTP Local) without local endpoint: dropped",
            from: From::External6(0),
            to: to(n2_6, 30181),
            want: Want::NoAnswer,
        },
        Case {
            name: "IPv6 hairpin: pod → its own service → itself, masqueraded",
            from: From::Pod6("web-1a"),
            to: to(vip6(0x20), 8080),
            want: Want::Pods(&["web-1a"], Seen::Node(0)),
        },
        Case {
            name: "dual-stack service on its IPv4 cluster IP",
            from: From::Pod("web-2a"),
            to: to(Ipv4Addr::new(198, 19, 0, 40), 8080),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "dual-stack service on its IPv6 cluster IP: the same backend",
            from: From::Pod6("web-2a"),
            to: to(vip6(0x40), 8080),
            want: Want::Pods(&["web-1a"], Seen::Client),
        },
        Case {
            name: "IPv6 host process → IPv6 ClusterIP (socket hooks)",
            from: From::Host6(1),
            to: to(vip6(0x10), 8080),
            want: Want::Pods(both, Seen::Node(1)),
        },
        Case {
            name: "IPv6 service without endpoints: refused (ICMPv6 port unreachable)",
            from: From::Pod6("web-2a"),
            to: to(vip6(0x30), 8080),
            want: Want::RefusedOnRetry,
        },
        Case {
            name: "an IPv6-only service has no NodePort on IPv4 addresses: refused by the node's stack",
            from: From::External(0),
            to: to(N1, 30180),
            want: Want::Refused,
        },
    ];
    for case in &cases {
        check(&cluster, case);
    }
    // External IPv6 traffic went to node 1's NodePorts.
    assert_xdp_used(xdp, &agents[..1]);
}

/// Host processes (socket hooks): an unconnected UDP socket keeps each
/// service on one backend and sees every reply from the service's address,
/// also when it talks to two services; a service without endpoints is
/// ECONNREFUSED at once, as kube-proxy's REJECT makes it.
#[test]
fn host_udp_sockets_stick_to_one_backend_and_services_without_endpoints_refuse() {
    use std::net::UdpSocket;
    let cluster = Cluster::new([&["web-1a", "web-1b"], &["web-2a", "web-2b"]]).expect("cluster");
    let three = cluster.endpoints(&["web-1a", "web-1b", "web-2a"]);
    let dns = ("dns", "UDP", 53, 5353, None);
    let docs = [
        service("dns3", "  clusterIP: 198.19.0.50\n", "", &[dns], &three),
        service(
            "dns1",
            "  clusterIP: 198.19.0.51\n",
            "",
            &[dns],
            &cluster.endpoints(&["web-2b"]),
        ),
        service(
            "empty",
            "  clusterIP: 198.19.0.13\n",
            "",
            &[dns, ("http", "TCP", 8080, 80, None)],
            &[] as &[(String, Ipv4Addr, String)],
        ),
    ];
    cluster.write_manifest("services.yaml", &docs.join("---\n")).unwrap();
    let _agents = cluster.start_agents(true).expect("agents");
    let dns3 = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 50), 53));
    let dns1 = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 51), 53));
    let empty_udp = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 13), 53));
    let empty_tcp = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 13), 8080));

    // One unconnected socket queries both services, both queries in flight
    // at once: every answer (pod, source) must show its service's address.
    let answers = cluster.nodes[0]
        .ns
        .run(move || -> anyhow::Result<Vec<(String, SocketAddr)>> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut out = Vec::new();
            for _ in 0..8 {
                socket.send_to(b"who are you", dns3)?;
                socket.send_to(b"who are you", dns1)?;
                for _ in 0..2 {
                    let mut buf = [0u8; 1500];
                    let (n, from) = socket.recv_from(&mut buf)?;
                    out.push((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from));
                }
            }
            Ok(out)
        })
        .unwrap()
        .expect("UDP answers");
    let mut dns3_pods = BTreeSet::new();
    for (pod, from) in &answers {
        let service = if pod == "web-2b" { dns1 } else { dns3 };
        assert_eq!(
            *from, service,
            "the answer of {pod} must come from its service's address and port"
        );
        if service == dns3 {
            dns3_pods.insert(pod.as_str());
        }
    }
    assert_eq!(answers.len(), 16);
    assert_eq!(dns3_pods.len(), 1, "one socket, one backend per service: {dns3_pods:?}");

    // Without endpoints: ECONNREFUSED for TCP connect, UDP connect and an
    // unconnected UDP send alike (kube-proxy's ICMP port unreachable shows
    // a UDP client ECONNREFUSED on its next call).
    let errors = cluster.nodes[0]
        .ns
        .run(move || {
            let kind = |r: std::io::Result<()>| r.map_err(|e| e.kind());
            let tcp = kind(TcpStream::connect_timeout(&empty_tcp, Duration::from_secs(1)).map(|_| ()));
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            let udp_send = kind(socket.send_to(b"x", empty_udp).map(|_| ()));
            let udp_connect = kind(socket.connect(empty_udp));
            [tcp, udp_connect, udp_send]
        })
        .unwrap();
    assert_eq!(
        errors,
        [Err(ErrorKind::ConnectionRefused); 3],
        "TCP connect, UDP connect, UDP sendto"
    );
}

/// One UDP datagram on a socket connected to `target` (it takes answers
/// from `target` only: an answer from any other source is never seen);
/// returns the answer.
fn udp_ask(target: SocketAddr) -> anyhow::Result<String> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.connect(target)?;
    socket.send(b"who are you")?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// UDP from `from` to `target`: `want` answers, each from `target` itself.
fn check_udp(c: &Cluster, name: &str, from: From, target: SocketAddr, want: &str) {
    let (ns, _) = source_ns(c, from);
    let answers = ns
        .run(move || (0..5).map(|_| udp_ask(target)).collect::<Vec<_>>())
        .unwrap();
    for a in answers {
        let got = a.unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(got, want, "{name}");
    }
}

const HOST_TCP: u16 = 6443;
const HOST_UDP: u16 = 6053;

/// Services whose only endpoint is node-1's own address (a host-network
/// endpoint): `kubernetes.default`-like ClusterIPs (IPv4 and IPv6) and
/// NodePorts with eTP Cluster and Local.
fn host_endpoint_manifests(c: &Cluster) -> String {
    let n1 = &c.nodes[0];
    let host = vec![("node-1-host".to_string(), n1.addr, n1.name.clone())];
    let host6 = vec![("node-1-host".to_string(), n1.addr6, n1.name.clone())];
    let ports = |tcp_np, udp_np| {
        [
            ("https", "TCP", 443, HOST_TCP, tcp_np),
            ("dns", "UDP", 53, HOST_UDP, udp_np),
        ]
    };
    [
        service("apiserver", "  clusterIP: 198.19.0.50\n", "", &ports(None, None), &host),
        service(
            "apiserver6",
            "  clusterIP: fd00:198:19::50\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n",
            "",
            &ports(None, None),
            &host6,
        ),
        // Nothing listens on the endpoint port: the node's port unreachable.
        service(
            "closed",
            "  clusterIP: 198.19.0.53\n",
            "",
            &[("dns", "UDP", 53, HOST_UDP + 1, None)],
            &host,
        ),
        service(
            "hostnet",
            "  type: NodePort\n  clusterIP: 198.19.0.51\n",
            "",
            &ports(Some(30443), Some(30453)),
            &host,
        ),
        service(
            "hostnet-local",
            "  type: NodePort\n  clusterIP: 198.19.0.52\n  externalTrafficPolicy: Local\n",
            "",
            &ports(Some(30444), Some(30454)),
            &host,
        ),
    ]
    .join("---\n")
}

/// Issue #12 point 2: a service whose endpoint is the node's own address
/// works from pods (both nodes), from the node itself and from outside,
/// over TCP and UDP, IPv4 and IPv6, with every reply coming from the
/// address the client used (a TCP handshake and a connected UDP socket
/// accept nothing else).
#[test]
fn host_network_endpoints_answer_from_pods_the_node_and_outside() {
    let cluster = Cluster::new([&NODE1, &NODE2]).expect("cluster");
    // The "API server": a host-network server in node-1's own namespace,
    // bound to the node's address like kube-apiserver's --bind-address.
    let n1 = &cluster.nodes[0];
    let _host = lb_tests::servers::Servers::start_on(
        &n1.ns,
        &[n1.addr.into(), n1.addr6.into()],
        "node-1-host",
        HOST_TCP,
        HOST_UDP,
    )
    .expect("host-network servers on node-1");
    cluster
        .write_manifest("services.yaml", &host_endpoint_manifests(&cluster))
        .unwrap();
    let agents = cluster.start_agents(true).expect("agents");
    let host: &'static [&'static str] = &["node-1-host"];
    let api = Ipv4Addr::new(198, 19, 0, 50);
    let api6: Ipv6Addr = "fd00:198:19::50".parse().unwrap();
    let cases = [
        Case {
            name: "pod on node-1 → ClusterIP → node-1 itself",
            from: From::Pod("web-1a"),
            to: to(api, 443),
            want: Want::Pods(host, Seen::Client),
        },
        Case {
            name: "pod on node-2 → ClusterIP → node-1",
            from: From::Pod("web-2a"),
            to: to(api, 443),
            want: Want::Pods(host, Seen::Client),
        },
        Case {
            name: "node-1 itself → ClusterIP → node-1 (socket hooks)",
            from: From::Host(0),
            to: to(api, 443),
            want: Want::Pods(host, Seen::Node(0)),
        },
        Case {
            name: "node-2 → ClusterIP → node-1 (socket hooks)",
            from: From::Host(1),
            to: to(api, 443),
            want: Want::Pods(host, Seen::Node(1)),
        },
        Case {
            name: "external → node-1 NodePort (eTP Cluster) → node-1: delivered locally, not masqueraded",
            from: From::External(0),
            to: to(N1, 30443),
            want: Want::Pods(host, Seen::Client),
        },
        Case {
            name: "external → node-1 NodePort (eTP Local) → node-1",
            from: From::External(0),
            to: to(N1, 30444),
            want: Want::Pods(host, Seen::Client),
        },
        Case {
            name: "external → node-2 NodePort (eTP Cluster) → node-1, masqueraded by node-2",
            from: From::External(1),
            to: to(N2, 30443),
            want: Want::Pods(host, Seen::Node(1)),
        },
        Case {
            name: "IPv6 pod on node-1 → IPv6 ClusterIP → node-1 itself",
            from: From::Pod6("web-1a"),
            to: to(api6, 443),
            want: Want::Pods(host, Seen::Client),
        },
        Case {
            name: "IPv6 node-1 itself → IPv6 ClusterIP → node-1 (socket hooks)",
            from: From::Host6(0),
            to: to(api6, 443),
            want: Want::Pods(host, Seen::Node(0)),
        },
    ];
    for case in &cases {
        check(&cluster, case);
    }
    for (name, from, target) in [
        ("UDP pod on node-1 → ClusterIP", From::Pod("web-1a"), to(api, 53)),
        ("UDP pod on node-2 → ClusterIP", From::Pod("web-2a"), to(api, 53)),
        ("UDP node-1 → ClusterIP (socket hooks)", From::Host(0), to(api, 53)),
        (
            "UDP external → NodePort (eTP Cluster)",
            From::External(0),
            to(N1, 30453),
        ),
        ("UDP external → NodePort (eTP Local)", From::External(0), to(N1, 30454)),
        (
            "UDP IPv6 pod on node-1 → IPv6 ClusterIP",
            From::Pod6("web-1a"),
            to(api6, 53),
        ),
    ] {
        check_udp(&cluster, name, from, target, "node-1-host");
    }
    // No server on the endpoint port: the node's ICMP port unreachable
    // reaches the client about its own packet (to the cluster IP), so its
    // connected socket is refused at once instead of waiting in vain.
    let closed = to(Ipv4Addr::new(198, 19, 0, 53), 53);
    let refused = cluster
        .pod("web-1a")
        .ns
        .run(move || udp_ask(closed).map_err(|e| e.downcast::<std::io::Error>().map(|e| e.kind()).ok()))
        .unwrap();
    assert_eq!(
        refused,
        Err(Some(ErrorKind::ConnectionRefused)),
        "UDP to a closed host port"
    );
    // Node-1 delivered the balanced packets locally and translated the replies at egress.
    let n1 = &agents[0];
    assert!(
        n1.counter("event", "local_endpoint").unwrap() > 0,
        "local_endpoint counted"
    );
    assert!(
        n1.counter("event", "egress_reverse_nat").unwrap() > 0,
        "egress_reverse_nat counted"
    );
    assert_eq!(
        n1.counter("drop", "no_route").unwrap(),
        0,
        "nothing dropped as unroutable"
    );
}

/// Issue #12 point 7: an iptables FORWARD rule (what iptables-based
/// NetworkPolicy programs) blocking pod `web-1b` is bypassed by the default
/// redirect forwarding but enforced on ClusterIP and NodePort traffic with
/// `--forwarding-mode stack`, while other pods keep answering.
#[test]
fn iptables_forward_rules_apply_to_service_traffic_in_stack_forwarding_mode() {
    let mut cluster = Cluster::new([&["client-1", "web-1a", "web-1b"], &NODE2]).expect("cluster");
    let open = cluster.endpoints(&["web-1a"]);
    let blocked = cluster.endpoints(&["web-1b"]);
    let open6 = cluster.endpoints6(&["web-1a"]);
    let blocked6 = cluster.endpoints6(&["web-1b"]);
    let http = |np: Option<u16>| ("http", "TCP", 8080, 80, np);
    let dns = |np: Option<u16>| ("dns", "UDP", 53, 5353, np);
    let v6_only = "  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n";
    let docs = [
        service(
            "open",
            "  type: NodePort\n  clusterIP: 198.19.0.61\n",
            "",
            &[http(Some(30601)), dns(Some(30611))],
            &open,
        ),
        service(
            "blocked",
            "  type: NodePort\n  clusterIP: 198.19.0.60\n",
            "",
            &[http(Some(30600))],
            &blocked,
        ),
        service(
            "open6",
            &format!("  type: NodePort\n  clusterIP: fd00:198:19::61\n{v6_only}"),
            "",
            &[http(Some(30621))],
            &open6,
        ),
        service(
            "blocked6",
            &format!("  clusterIP: fd00:198:19::60\n{v6_only}"),
            "",
            &[http(None)],
            &blocked6,
        ),
    ];
    cluster.write_manifest("services.yaml", &docs.join("---\n")).unwrap();
    // What an iptables NetworkPolicy would program on node-1: web-1b takes nothing forwarded.
    let node1 = &cluster.nodes[0].ns;
    let b = cluster.pod("web-1b");
    lb_tests::netns::run(
        node1
            .command("iptables-nft")
            .args(["-A", "FORWARD", "-d", &b.ip.to_string(), "-j", "DROP"]),
    )
    .unwrap();
    lb_tests::netns::run(node1.command("ip6tables-nft").args([
        "-A",
        "FORWARD",
        "-d",
        &b.ip6.to_string(),
        "-j",
        "DROP",
    ]))
    .unwrap();
    let n1_6 = cluster.nodes[0].addr6;
    let vip6 = |host: u16| Ipv6Addr::new(0xfd00, 0x198, 0x19, 0, 0, 0, 0, host);
    let a: &'static [&'static str] = &["web-1a"];
    let b_only: &'static [&'static str] = &["web-1b"];
    // (case name, from, to, answered by with redirect forwarding, with stack forwarding)
    let table = [
        (
            "pod → ClusterIP of web-1b",
            From::Pod("client-1"),
            to(Ipv4Addr::new(198, 19, 0, 60), 8080),
            Some((b_only, Seen::Client)),
            None,
        ),
        (
            "pod → ClusterIP of web-1a",
            From::Pod("client-1"),
            to(Ipv4Addr::new(198, 19, 0, 61), 8080),
            Some((a, Seen::Client)),
            Some((a, Seen::Client)),
        ),
        (
            "external → NodePort of web-1b",
            From::External(0),
            to(N1, 30600),
            Some((b_only, Seen::Node(0))),
            None,
        ),
        (
            "external → NodePort of web-1a (masqueraded)",
            From::External(0),
            to(N1, 30601),
            Some((a, Seen::Node(0))),
            Some((a, Seen::Node(0))),
        ),
        (
            "hairpin: web-1a → its own ClusterIP → itself (masqueraded)",
            From::Pod("web-1a"),
            to(Ipv4Addr::new(198, 19, 0, 61), 8080),
            Some((a, Seen::Node(0))),
            Some((a, Seen::Node(0))),
        ),
        (
            "pod → web-1b's own address (plain routing: always filtered)",
            From::Pod("client-1"),
            to(b.ip, 80),
            None,
            None,
        ),
        (
            "IPv6 pod → ClusterIP of web-1b",
            From::Pod6("client-1"),
            to(vip6(0x60), 8080),
            Some((b_only, Seen::Client)),
            None,
        ),
        (
            "IPv6 pod → ClusterIP of web-1a",
            From::Pod6("client-1"),
            to(vip6(0x61), 8080),
            Some((a, Seen::Client)),
            Some((a, Seen::Client)),
        ),
        (
            "IPv6 external → NodePort of web-1a (masqueraded)",
            From::External6(0),
            to(n1_6, 30621),
            Some((a, Seen::Node(0))),
            Some((a, Seen::Node(0))),
        ),
    ];
    for stack in [false, true] {
        cluster.set_agent_args(if stack { &["--forwarding-mode", "stack"] } else { &[] });
        let agents = cluster.start_agents(true).expect("agents");
        let mode = if stack { "stack" } else { "redirect" };
        for (name, from, target, redirect, stacked) in &table {
            let want = match if stack { stacked } else { redirect } {
                Some((pods, seen)) => Want::Pods(pods, *seen),
                None => Want::NoAnswer,
            };
            let name: &'static str = format!("{mode} forwarding: {name}").leak();
            check(
                &cluster,
                &Case {
                    name,
                    from: *from,
                    to: *target,
                    want,
                },
            );
        }
        check_udp(
            &cluster,
            &format!("{mode}: UDP external → NodePort of web-1a"),
            From::External(0),
            to(N1, 30611),
            "web-1a",
        );
        check_udp(
            &cluster,
            &format!("{mode}: UDP pod → ClusterIP of web-1a"),
            From::Pod("client-1"),
            to(Ipv4Addr::new(198, 19, 0, 61), 53),
            "web-1a",
        );
        let masqueraded_at_egress = agents[0].counter("event", "egress_masquerade").unwrap();
        assert_eq!(masqueraded_at_egress > 0, stack, "{mode}: masquerading at egress");
        for agent in agents {
            agent.kill().unwrap();
        }
    }
}
