//! SCTP services end to end on the two-node cluster, with the XDP fast
//! path on the underlay (native mode): a pod reaching a ClusterIP (TC on
//! its veth, DNAT only, the reply by XDP) and an external client reaching
//! a NodePort (XDP, masqueraded), IPv4 and IPv6. The kernel has no SCTP
//! module, so both ends are raw IPPROTO_SCTP sockets (`lb_tests::sctp`):
//! the client sends INIT to the service, the backend pod checks what
//! arrives (addresses, ports, CRC32c) and answers INIT ACK, which must
//! reach the client from the service's address and port with a valid
//! CRC32c.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use lb_tests::cluster::{Cluster, XdpMode};
use lb_tests::manifests::{PortDef, ServiceDef, join, typed_service};
use lb_tests::netns::Netns;
use lb_tests::sctp::{INIT, INIT_ACK, answer_init, associate, client_tag};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 60);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x19, 0, 0, 0, 0, 0x60);
/// Service port ≠ target port: DNAT changes the port, the CRC32c follows.
const PORT: u16 = 3868;
const TARGET: u16 = 3869;
const NODE_PORT: u16 = 30868;
const NODE_PORT6: u16 = 30869;
const TIMEOUT: Duration = Duration::from_secs(3);

/// Who the backend must see as the INIT's source.
#[derive(Debug)]
enum Seen {
    /// The client itself, from its own port.
    Client,
    /// Node `i`'s underlay address (of the client's family), from a
    /// masquerade port.
    Node(usize),
}

/// The IPv6 twin of the IPv4 service (the sandbox's manifest helpers are
/// IPv4-only): single-stack, its own NodePort.
fn service6(backend: Ipv6Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: sig6, namespace: net-test}}
spec:
  type: NodePort
  clusterIP: {VIP6}
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: diameter, protocol: SCTP, port: {PORT}, targetPort: {TARGET}, nodePort: {NODE_PORT6}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sig6-v6abc
  namespace: net-test
  labels: {{kubernetes.io/service-name: sig6}}
addressType: IPv6
ports:
- {{name: diameter, protocol: SCTP, port: {TARGET}}}
endpoints:
- addresses: ["{backend}"]
  conditions: {{ready: true}}
  nodeName: node-2
"#
    )
}

struct Case<'a> {
    name: &'static str,
    client: &'a Netns,
    client_ip: IpAddr,
    service: SocketAddr,
    sport: u16,
    seen: Seen,
}

#[test]
fn sctp_reaches_clusterip_and_nodeport_backends_with_valid_crc32c() {
    let mut cluster = Cluster::new([&["client-1a"], &["sig-2a"]]).expect("cluster");
    cluster
        .enable_xdp(XdpMode::Native)
        .expect("preparing the veths for XDP");
    let backend = cluster.pod("sig-2a");
    let (backend_ns, backend_ip, backend_ip6) = (&backend.ns, backend.ip, backend.ip6);
    let def = ServiceDef {
        name: "sig",
        cluster_ip: VIP,
        ports: vec![PortDef {
            name: "diameter",
            protocol: "SCTP",
            port: PORT,
            target_port: TARGET,
        }],
        endpoints: vec![("sig-2a".into(), backend_ip)],
    };
    let manifest = join(&[typed_service(&def, "NodePort", Some(NODE_PORT)), service6(backend_ip6)]);
    cluster.write_manifest("sctp.yaml", &manifest).unwrap();
    let agents = cluster.start_agents(true).expect("agents");
    let (node1, client_pod, external) = (&cluster.nodes[0], cluster.pod("client-1a"), &cluster.externals[0]);
    let cases = [
        Case {
            name: "pod → ClusterIP (backend on the other node): DNAT only",
            client: &client_pod.ns,
            client_ip: client_pod.ip.into(),
            service: SocketAddr::new(VIP.into(), PORT),
            sport: 40001,
            seen: Seen::Client,
        },
        Case {
            name: "external → node-1 NodePort: masqueraded by node-1",
            client: &external.1,
            client_ip: external.0.into(),
            service: SocketAddr::new(node1.addr.into(), NODE_PORT),
            sport: 40002,
            seen: Seen::Node(0),
        },
        Case {
            name: "IPv6 pod → IPv6 ClusterIP: DNAT only",
            client: &client_pod.ns,
            client_ip: client_pod.ip6.into(),
            service: SocketAddr::new(VIP6.into(), PORT),
            sport: 40003,
            seen: Seen::Client,
        },
        Case {
            name: "IPv6 external → node-1 IPv6 NodePort: masqueraded by node-1",
            client: &external.1,
            client_ip: cluster.externals6[0].into(),
            service: SocketAddr::new(node1.addr6.into(), NODE_PORT6),
            sport: 40004,
            seen: Seen::Node(0),
        },
    ];
    for case in cases {
        let Case {
            name,
            client,
            client_ip,
            service,
            sport,
            seen,
        } = case;
        let (v6, tag) = (service.is_ipv6(), client_tag(sport));
        let backend = backend_ns.spawn(move || answer_init(v6, TARGET, tag, TIMEOUT)).unwrap();
        let ack = client
            .run(move || associate(service, sport, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let init = backend
            .join()
            .unwrap()
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: backend: {e:#}"));

        let backend_addr: IpAddr = if v6 { backend_ip6.into() } else { backend_ip.into() };
        assert_eq!(init.chunk, INIT, "{name}");
        assert!(init.crc_ok, "{name}: the backend got a bad CRC32c: {init:?}");
        assert_eq!(init.dst, SocketAddr::new(backend_addr, TARGET), "{name}: DNAT");
        match seen {
            Seen::Client => assert_eq!(init.src, SocketAddr::new(client_ip, sport), "{name}: source kept"),
            Seen::Node(i) => {
                let node = &cluster.nodes[i];
                let node_addr: IpAddr = if v6 { node.addr6.into() } else { node.addr.into() };
                assert_eq!(init.src.ip(), node_addr, "{name}: masqueraded");
                assert!(
                    lb_common::conntrack::snat_ports::contains(init.src.port()),
                    "{name}: masquerade port {}",
                    init.src.port()
                );
            }
        }
        assert_eq!(ack.chunk, INIT_ACK, "{name}");
        assert!(ack.crc_ok, "{name}: the client got a bad CRC32c: {ack:?}");
        assert_eq!(ack.src, service, "{name}: the reply comes from the service");
        assert_eq!(ack.dst, SocketAddr::new(client_ip, sport), "{name}: to the client");
    }
    let forwarded = agents[0].counter("event", "xdp_forwarded").unwrap();
    assert!(forwarded > 0, "node-1's XDP carried none of the SCTP packets");

    // `lb-agent trace --proto sctp` shows the same translation.
    let src = SocketAddr::new(client_pod.ip.into(), 41000).to_string();
    let dst = SocketAddr::new(VIP.into(), PORT).to_string();
    let out = lb_tests::netns::run(
        node1
            .ns
            .command(lb_tests::agent::agent_bin().to_str().unwrap())
            .args(["trace", "--proto", "sctp", "--src", &src, "--dst", &dst, "-o", "json"])
            .arg("--bpf-root")
            .arg(&node1.bpf_root),
    )
    .unwrap();
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["verdict"], "forward (redirect)", "{t}");
    assert_eq!(t["frontend"], format!("{dst}/SCTP"), "{t}");
    assert_eq!(t["out_src"], src, "{t}");
    assert_eq!(
        t["out_dst"],
        SocketAddr::new(backend_ip.into(), TARGET).to_string(),
        "{t}"
    );
}
