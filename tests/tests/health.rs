//! kube-proxy's health answers on the two-node netns cluster: the
//! healthCheckNodePort of an externalTrafficPolicy Local load balancer over
//! IPv4 and IPv6 (200 where the node has ready endpoints, 503 elsewhere and
//! once its endpoints terminate, so the node drains), and the proxy's
//! /healthz (503 once the Node is being deleted) and /livez (node ignored).

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_tests::cluster::Cluster;

const HEALTH_PORT: u16 = 32000;
const PROXY_HEALTH_PORT: u16 = 10256;

/// Status code, headers (lower case) and JSON body of `GET path`.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String, serde_json::Value)> {
    let (code, head, body) = get_text(addr, path)?;
    Ok((code, head, serde_json::from_str(&body)?))
}

/// Status code, headers (lower case) and body of `GET path` (HTTP/1.0).
fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    conn.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split_whitespace().nth(1).unwrap_or_default().parse()?;
    Ok((code, head.to_ascii_lowercase(), body.to_string()))
}

/// The service with one ready pod on node 1 (both families), then the
/// same pod terminating, and the Nodes (node 1 possibly being deleted).
fn manifests(c: &Cluster, terminating: bool, node1_deleting: bool) -> String {
    let conditions = if terminating {
        "{ready: false, serving: true, terminating: true}"
    } else {
        "{ready: true}"
    };
    let pod = c.pod("web-1a");
    let mut y = "apiVersion: v1\nkind: Service\nmetadata: {name: web-local, namespace: net-test}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.50\n  clusterIPs: [198.19.0.50, 'fd00:198:19::50']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30050}]\n".to_string();
    for (family, ip) in [("IPv4", IpAddr::from(pod.ip)), ("IPv6", IpAddr::from(pod.ip6))] {
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-local-{family}\n  namespace: net-test\n  labels: {{kubernetes.io/service-name: web-local}}\naddressType: {family}\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n- addresses: ['{ip}']\n  conditions: {conditions}\n  nodeName: node-1\n"
        );
    }
    for node in ["node-1", "node-2"] {
        y += &format!("---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n");
        if node == "node-1" && node1_deleting {
            y += "  deletionTimestamp: '2026-01-01T00:00:00Z'\n  finalizers: [example.com/hold]\n";
        }
    }
    y
}

#[test]
fn health_check_node_port_and_proxy_health_like_kube_proxy() {
    let no_pods: &[&str] = &[];
    let cluster = Cluster::new([&["web-1a"], no_pods]).expect("cluster");
    cluster
        .write_manifest("services.yaml", &manifests(&cluster, false, false))
        .unwrap();
    let _agents = cluster.start_agents(true).expect("agents");
    let ext = &cluster.externals[0].1;
    let node = |i: usize, v6: bool, port: u16| {
        let n = &cluster.nodes[i];
        let ip: IpAddr = if v6 { n.addr6.into() } else { n.addr.into() };
        SocketAddr::new(ip, port)
    };
    // One request from the external client.
    let ask = |addr: SocketAddr, path: &'static str| ext.run(move || get(addr, path)).unwrap();
    // Polls `addr` until its answer passes `check` (the agent applies a
    // manifest change within its sync interval); returns the last answer.
    let wait_for = |addr: SocketAddr, path: &'static str, check: &dyn Fn(u16, &serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = ask(addr, path);
            match &answer {
                Ok((code, _, body)) if check(*code, body) => return answer.unwrap(),
                _ if Instant::now() > deadline => panic!("{addr}{path}: {answer:?}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };

    // Ready endpoints on node 1 only: both of its addresses (one pod, two
    // families) count; 200 there, 503 on node 2, over IPv4 and IPv6.
    for v6 in [false, true] {
        let (code, head, body) = ask(node(0, v6, HEALTH_PORT), "/").unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["service"]["namespace"], "net-test");
        assert_eq!(body["service"]["name"], "web-local");
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(body["serviceProxyHealthy"], true);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(head.contains("x-load-balancing-endpoint-weight: 2"), "{head}");
        let (code, _, body) = ask(node(1, v6, HEALTH_PORT), "/").unwrap();
        assert_eq!((code, &body["localEndpoints"]), (503, &0.into()), "node 2: {body}");
        for path in ["/healthz", "/livez"] {
            let (code, _, body) = ask(node(0, v6, PROXY_HEALTH_PORT), path).unwrap();
            assert_eq!((code, &body["healthy"]), (200, &true.into()), "{path}: {body}");
        }
    }

    // The pod terminates: node 1 fails its health check (drains) although
    // the terminating pod still serves.
    cluster
        .write_manifest("services.yaml", &manifests(&cluster, true, false))
        .unwrap();
    let (_, _, body) = wait_for(node(0, false, HEALTH_PORT), "/", &|code, _| code == 503);
    assert_eq!(body["localEndpoints"], 0, "{body}");

    // Node 1 is being deleted: /healthz 503 there (node not eligible),
    // /livez still 200; node 2 stays healthy.
    cluster
        .write_manifest("services.yaml", &manifests(&cluster, true, true))
        .unwrap();
    let (_, _, body) = wait_for(node(0, true, PROXY_HEALTH_PORT), "/healthz", &|code, _| code == 503);
    assert_eq!(
        (&body["nodeEligible"], &body["healthy"]),
        (&false.into(), &true.into()),
        "{body}"
    );
    let (code, _, body) = ask(node(0, false, PROXY_HEALTH_PORT), "/livez").unwrap();
    assert_eq!(code, 200, "/livez ignores the node: {body}");
    assert!(body.get("nodeEligible").is_none(), "{body}");
    let (code, _, body) = ask(node(1, false, PROXY_HEALTH_PORT), "/healthz").unwrap();
    assert_eq!((code, &body["nodeEligible"]), (200, &true.into()), "node 2: {body}");

    // The answers are counted like kube-proxy's proxy_healthz_total.
    let metrics = cluster.nodes[0]
        .ns
        .run(|| get_text(SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics"))
        .unwrap()
        .unwrap()
        .2;
    for series in [
        "lbagent_proxy_healthz_total{code=\"200\"}",
        "lbagent_proxy_healthz_total{code=\"503\"}",
        "lbagent_proxy_livez_total{code=\"200\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}
