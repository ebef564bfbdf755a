//! Kernel program tests: crafted packets through `lb_ingress` with
//! BPF_PROG_TEST_RUN (Cilium's PKTGEN / SETUP / CHECK), against maps the
//! agent's own sync code programmed. Needs root (CAP_BPF).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpFragOffset, IpHeaders, Ipv4Header, Ipv4Options, PacketBuilder};
use lb_agent::datapath::{ConntrackTimeouts, Datapath, LoadOptions};
use lb_agent::model::{Endpoint, Frontend, Model, Protocol, ServicePort};
use lb_agent::sync::Syncer;
use lb_common::{DropReason, FlowEvent};
use lb_tests::netns::Netns;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// The kernel tests' namespace routes 198.18.0.0/15 through a device
/// holding this address: the datapath's FIB lookups find a route, and
/// masquerading picks this as the node address.
const NODE_ADDR: [u8; 4] = [198, 18, 255, 254];

const CLIENT: [u8; 4] = [198, 18, 2, 10];
const VIP: [u8; 4] = [198, 19, 0, 10];
const UDP_VIP: [u8; 4] = [198, 19, 0, 11];
const BACKEND: [u8; 4] = [198, 18, 1, 11];
const UDP_BACKEND: [u8; 4] = [198, 18, 1, 12];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

// ---- PKTGEN ---------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Tcp {
    Syn,
    SynAck,
    Ack,
    FinAck,
    Rst,
}

struct Ip {
    src: [u8; 4],
    dst: [u8; 4],
    options: &'static [u8],
    more_fragments: bool,
    fragment_offset: u16,
    ttl: u8,
}

fn ip(src: [u8; 4], dst: [u8; 4]) -> Ip {
    Ip {
        src,
        dst,
        options: &[],
        more_fragments: false,
        fragment_offset: 0,
        ttl: 64,
    }
}

impl Ip {
    /// As it leaves the node: the datapath forwards NATed packets itself,
    /// decrementing the TTL like a router.
    fn forwarded(mut self) -> Self {
        self.ttl -= 1;
        self
    }
}

fn ip_header(ip: &Ip) -> IpHeaders {
    let mut h = Ipv4Header::new(0, ip.ttl, etherparse::IpNumber::TCP, ip.src, ip.dst).unwrap();
    h.options = Ipv4Options::try_from(ip.options).unwrap();
    h.more_fragments = ip.more_fragments;
    h.fragment_offset = IpFragOffset::try_new(ip.fragment_offset).unwrap();
    h.identification = 0x1234;
    IpHeaders::Ipv4(h, Default::default())
}

fn tcp(ip: Ip, sport: u16, dport: u16, flags: Tcp) -> Vec<u8> {
    tcp_over(ip_header(&ip), sport, dport, flags)
}

/// A TCP segment (fixed sequence numbers and payload) over `ip`, either family.
fn tcp_over(ip: IpHeaders, sport: u16, dport: u16, flags: Tcp) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(ip)
        .tcp(sport, dport, 1000, 64240);
    let b = match flags {
        Tcp::Syn => b.syn(),
        Tcp::SynAck => b.syn().ack(1001),
        Tcp::Ack => b.ack(1001),
        Tcp::FinAck => b.fin().ack(1001),
        Tcp::Rst => b.rst(),
    };
    let payload = b"GET / HTTP/1.0\r\n\r\n";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

fn udp(ip: Ip, sport: u16, dport: u16) -> Vec<u8> {
    udp_over(ip_header(&ip), sport, dport)
}

/// A UDP datagram (fixed payload) over `ip`, either family.
fn udp_over(ip: IpHeaders, sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ip(ip).udp(sport, dport);
    let payload = b"query";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

/// What kube-proxy's REJECT answers to `pkt` (Ethernet + IPv4 without
/// options): ICMP port unreachable from its destination to its source,
/// quoting its IP header and L4 header (the 8 bytes of UDP; TCP's first 20,
/// through the checksum field).
fn port_unreachable_for(pkt: &[u8]) -> Vec<u8> {
    use etherparse::icmpv4::DestUnreachableHeader;
    if pkt[12..14] == [0x86, 0xdd] {
        return port_unreachable6_for(pkt);
    }
    let (src, dst): ([u8; 4], [u8; 4]) = (pkt[26..30].try_into().unwrap(), pkt[30..34].try_into().unwrap());
    let mut h = Ipv4Header::new(0, 64, etherparse::IpNumber::ICMP, dst, src).unwrap();
    h.dont_fragment = false;
    h.identification = 0;
    let mac = |at: usize| -> [u8; 6] { pkt[at..at + 6].try_into().unwrap() };
    let b = PacketBuilder::ethernet2(mac(0), mac(6))
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ));
    let quoted = &pkt[14..14 + 20 + quoted_l4(pkt[23])];
    let mut out = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut out, quoted).unwrap();
    out
}

/// The IPv6 REJECT: ICMPv6 port unreachable from the packet's destination
/// to its source, quoting its IPv6 header and the same L4 bytes as IPv4's.
fn port_unreachable6_for(pkt: &[u8]) -> Vec<u8> {
    let (src, dst): ([u8; 16], [u8; 16]) = (pkt[22..38].try_into().unwrap(), pkt[38..54].try_into().unwrap());
    let mac = |at: usize| -> [u8; 6] { pkt[at..at + 6].try_into().unwrap() };
    let h = etherparse::Ipv6Header {
        hop_limit: 64,
        source: dst,
        destination: src,
        next_header: etherparse::IpNumber::IPV6_ICMP,
        ..Default::default()
    };
    let b = PacketBuilder::ethernet2(mac(0), mac(6))
        .ip(IpHeaders::Ipv6(h, Default::default()))
        .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
            etherparse::icmpv6::DestUnreachableCode::Port,
        ));
    let quoted = &pkt[14..14 + 40 + quoted_l4(pkt[20])];
    let mut out = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut out, quoted).unwrap();
    out
}

/// How much of the L4 header a REJECT quotes: TCP through its checksum,
/// SCTP's common header, UDP's header.
fn quoted_l4(protocol: u8) -> usize {
    match protocol {
        6 => 20,
        132 => 12,
        _ => 8,
    }
}

/// UDP checksum 0 means "no checksum" and must stay 0 through NAT.
fn without_udp_checksum(mut pkt: Vec<u8>) -> Vec<u8> {
    let l4 = 14 + 20;
    pkt[l4 + 6] = 0;
    pkt[l4 + 7] = 0;
    pkt
}

// ---- SETUP ----------------------------------------------------------------

fn v4(a: [u8; 4]) -> std::net::IpAddr {
    Ipv4Addr::from(a).into()
}

fn service_port(vip: [u8; 4], port: u16, protocol: Protocol, backends: &[([u8; 4], u16)]) -> ServicePort {
    let frontend = Frontend::new(v4(vip), port, protocol);
    ServicePort::new(
        format!("net-test/{frontend}"),
        frontend,
        backends
            .iter()
            .map(|&(ip, port)| Endpoint { ip: v4(ip), port })
            .collect(),
    )
}

fn model(ports: Vec<ServicePort>) -> Model {
    Model::from_ports(ports)
}

fn default_model() -> Model {
    model(vec![
        service_port(VIP, 8080, Protocol::Tcp, &[(BACKEND, 80)]),
        service_port(VIP, 9090, Protocol::Tcp, &[([198, 18, 1, 13], 90)]),
        service_port(UDP_VIP, 53, Protocol::Udp, &[(UDP_BACKEND, 5353)]),
        service_port([198, 19, 0, 12], 80, Protocol::Tcp, &[]),
    ])
}

struct Harness {
    datapath: Datapath,
    syncer: Syncer,
    netns: Netns,
}

static NETNS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Moves the calling (test) thread into a new namespace with a route for
/// 198.18.0.0/15, so FIB lookups from BPF_PROG_TEST_RUN are deterministic.
fn enter_test_netns() -> Netns {
    let name = format!(
        "lbk-{}-{}",
        std::process::id(),
        NETNS_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let ns = Netns::create(&name).expect("creating the test namespace");
    // (No dummy driver on this kernel: a veth pair inside the namespace.)
    ns.ip(&["link", "add", "lbk0", "type", "veth", "peer", "name", "lbk1"])
        .unwrap();
    let addr = format!("{}/15", Ipv4Addr::from(NODE_ADDR));
    ns.ip(&["addr", "add", &addr, "dev", "lbk0"]).unwrap();
    // IPv6 likewise: fd00:198:18::/48 through lbk0 (no DAD: usable at once).
    let addr6 = format!("{}/48", Ipv6Addr::from(NODE_ADDR6));
    ns.ip(&["-6", "addr", "add", &addr6, "dev", "lbk0", "nodad"]).unwrap();
    ns.ip(&["link", "set", "lbk1", "up"]).unwrap();
    ns.ip(&["link", "set", "lbk0", "up"]).unwrap();
    // The FIB refuses forwarding lookups where forwarding is off (as on a node it is on).
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    let file = std::fs::File::open(ns.path()).unwrap();
    // SAFETY: setns on this thread only; the fd is open.
    assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
    ns
}

impl Harness {
    fn new(model: &Model) -> Self {
        Self::with_conntrack(model, 4096)
    }

    fn with_conntrack(model: &Model, conntrack_max: u32) -> Self {
        let netns = enter_test_netns();
        let datapath =
            Datapath::load(&LoadOptions::new(None, conntrack_max)).expect("loading the datapath (run as root)");
        let mut h = Harness {
            datapath,
            syncer: Syncer::new(),
            netns,
        };
        h.sync(model);
        h
    }

    fn sync(&mut self, model: &Model) {
        self.syncer.sync(&mut self.datapath.maps, model).expect("sync");
    }

    fn run(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; pkt.len() + 256];
        let prog = self.datapath.ingress_program().unwrap();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.datapath.maps.drops(reason).unwrap()
    }
}

// ---- CHECK ----------------------------------------------------------------

enum Expect {
    /// Rewritten into exactly this packet (checksums included) and
    /// forwarded out of the node by the datapath.
    Rewritten(Vec<u8>),
    /// Passed untouched.
    Untouched,
    /// Answered with ICMP port unreachable, sent back where it came from
    /// (counted as `Rejected`).
    Rejected,
    /// Dropped and counted under this reason.
    Dropped(DropReason),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn check(h: &mut Harness, case: Case) {
    let before = match &case.expect {
        Expect::Dropped(r) => h.drops(*r),
        Expect::Rejected => h.drops(DropReason::Rejected),
        _ => 0,
    };
    let (action, out) = h.run(&case.input);
    match case.expect {
        Expect::Rewritten(want) => {
            assert_eq!(action, TC_ACT_REDIRECT, "{}: action (forwarded by FIB)", case.name);
            assert_eq!(hex(&out), hex(&want), "{}: output packet", case.name);
        }
        Expect::Rejected => {
            assert_eq!(action, TC_ACT_REDIRECT, "{}: action (sent back)", case.name);
            assert_eq!(
                hex(&out),
                hex(&port_unreachable_for(&case.input)),
                "{}: ICMP packet",
                case.name
            );
            assert_eq!(
                h.drops(DropReason::Rejected),
                before + 1,
                "{}: rejected counter",
                case.name
            );
        }
        Expect::Untouched => {
            assert_eq!(action, TC_ACT_OK, "{}: action", case.name);
            assert_eq!(hex(&out), hex(&case.input), "{}: packet must be untouched", case.name);
        }
        Expect::Dropped(reason) => {
            assert_eq!(action, TC_ACT_SHOT, "{}: action", case.name);
            assert_eq!(h.drops(reason), before + 1, "{}: drop counter {reason:?}", case.name);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn run_table(h: &mut Harness, cases: Vec<Case>) {
    for case in cases {
        check(h, case);
    }
}

// ---- Tests ------------------------------------------------------------------

#[test]
fn clusterip_tcp_dnat_and_reverse_nat() {
    let mut h = Harness::new(&default_model());
    run_table(
        &mut h,
        vec![
            Case {
                name: "SYN to VIP:8080 is DNATed to the backend with valid checksums",
                input: tcp(ip(CLIENT, VIP), 40000, 8080, Tcp::Syn),
                expect: Expect::Rewritten(tcp(ip(CLIENT, BACKEND).forwarded(), 40000, 80, Tcp::Syn)),
            },
            Case {
                name: "backend's SYN-ACK is reverse-NATed to come from VIP:8080",
                input: tcp(ip(BACKEND, CLIENT), 80, 40000, Tcp::SynAck),
                expect: Expect::Rewritten(tcp(ip(VIP, CLIENT).forwarded(), 8080, 40000, Tcp::SynAck)),
            },
            Case {
                name: "the flow's next packet follows the conntrack entry",
                input: tcp(ip(CLIENT, VIP), 40000, 8080, Tcp::Ack),
                expect: Expect::Rewritten(tcp(ip(CLIENT, BACKEND).forwarded(), 40000, 80, Tcp::Ack)),
            },
            Case {
                name: "same VIP, other port: its own service",
                input: tcp(ip(CLIENT, VIP), 40001, 9090, Tcp::Syn),
                expect: Expect::Rewritten(tcp(ip(CLIENT, [198, 18, 1, 13]).forwarded(), 40001, 90, Tcp::Syn)),
            },
            Case {
                name: "VIP on a port no service has passes untouched",
                input: tcp(ip(CLIENT, VIP), 40002, 9999, Tcp::Syn),
                expect: Expect::Untouched,
            },
            Case {
                name: "UDP to the TCP service port passes untouched",
                input: udp(ip(CLIENT, VIP), 40003, 8080),
                expect: Expect::Untouched,
            },
            Case {
                name: "unknown address passes untouched",
                input: tcp(ip(CLIENT, [198, 19, 9, 9]), 40004, 8080, Tcp::Syn),
                expect: Expect::Untouched,
            },
            Case {
                name: "backend traffic that is not a reply passes untouched",
                input: tcp(ip(BACKEND, CLIENT), 80, 41000, Tcp::Ack),
                expect: Expect::Untouched,
            },
            Case {
                name: "service without endpoints: ICMP port unreachable back to the client (REJECT)",
                input: tcp(ip(CLIENT, [198, 19, 0, 12]), 40005, 80, Tcp::Syn),
                expect: Expect::Rejected,
            },
        ],
    );
}

#[test]
fn clusterip_udp_round_trip_and_zero_checksum() {
    let mut h = Harness::new(&default_model());
    run_table(
        &mut h,
        vec![
            Case {
                name: "UDP to VIP:53 is DNATed",
                input: udp(ip(CLIENT, UDP_VIP), 50000, 53),
                expect: Expect::Rewritten(udp(ip(CLIENT, UDP_BACKEND).forwarded(), 50000, 5353)),
            },
            Case {
                name: "UDP reply is reverse-NATed",
                input: udp(ip(UDP_BACKEND, CLIENT), 5353, 50000),
                expect: Expect::Rewritten(udp(ip(UDP_VIP, CLIENT).forwarded(), 53, 50000)),
            },
            Case {
                name: "UDP without checksum keeps checksum 0",
                input: without_udp_checksum(udp(ip(CLIENT, UDP_VIP), 50001, 53)),
                expect: Expect::Rewritten(without_udp_checksum(udp(
                    ip(CLIENT, UDP_BACKEND).forwarded(),
                    50001,
                    5353,
                ))),
            },
        ],
    );
}

#[test]
fn malformed_and_unusual_packets() {
    let mut h = Harness::new(&default_model());
    let syn = tcp(ip(CLIENT, VIP), 40000, 8080, Tcp::Syn);

    // IHL 4 (16 bytes) is not a valid IPv4 header.
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    // IP header complete but the TCP header cut after 10 bytes.
    let mut truncated_l4 = syn[..14 + 20 + 10].to_vec();
    truncated_l4[16..18].copy_from_slice(&30u16.to_be_bytes());
    // IHL claims 60 bytes of header (options) the packet does not have.
    // (The kernel's test_run refuses packets shorter than an IP header.)
    let mut options_beyond_end = syn[..14 + 20 + 10].to_vec();
    options_beyond_end[14] = 0x4f;
    options_beyond_end[16..18].copy_from_slice(&80u16.to_be_bytes());
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());

    let with_options = |src, dst| Ip {
        src,
        dst,
        options: &[1, 1, 1, 0],
        more_fragments: false,
        fragment_offset: 0,
        ttl: 64,
    };
    let first_fragment = Ip {
        src: CLIENT,
        dst: UDP_VIP,
        options: &[],
        more_fragments: true,
        fragment_offset: 0,
        ttl: 64,
    };
    let later_fragment = Ip {
        src: CLIENT,
        dst: UDP_VIP,
        options: &[],
        more_fragments: false,
        fragment_offset: 100,
        ttl: 64,
    };

    run_table(
        &mut h,
        vec![
            Case {
                name: "IHL below 5",
                input: bad_ihl,
                expect: Expect::Dropped(DropReason::BadIpHeader),
            },
            Case {
                name: "truncated TCP header",
                input: truncated_l4,
                expect: Expect::Dropped(DropReason::Truncated),
            },
            Case {
                name: "IP options running past the packet end",
                input: options_beyond_end,
                expect: Expect::Dropped(DropReason::Truncated),
            },
            Case {
                name: "non-IP (ARP) passes untouched",
                input: arp,
                expect: Expect::Untouched,
            },
            Case {
                name: "IP options: L4 found from IHL, DNAT keeps the options",
                input: tcp(with_options(CLIENT, VIP), 40010, 8080, Tcp::Syn),
                expect: Expect::Rewritten(tcp(with_options(CLIENT, BACKEND).forwarded(), 40010, 80, Tcp::Syn)),
            },
            Case {
                name: "IP options on the reply",
                input: tcp(with_options(BACKEND, CLIENT), 80, 40010, Tcp::SynAck),
                expect: Expect::Rewritten(tcp(with_options(VIP, CLIENT).forwarded(), 8080, 40010, Tcp::SynAck)),
            },
            Case {
                name: "first fragment to a service is dropped (counted)",
                input: udp(first_fragment, 50000, 53),
                expect: Expect::Dropped(DropReason::FragmentToService),
            },
            Case {
                name: "later fragment (no L4 header) passes untouched",
                input: udp(later_fragment, 50000, 53),
                expect: Expect::Untouched,
            },
        ],
    );
}

/// Which backend a flow from `sport` lands on.
fn backend_of(h: &mut Harness, sport: u16, flags: Tcp) -> [u8; 4] {
    backend_for(h, CLIENT, sport, flags)
}

/// Which backend a flow from `client`:`sport` lands on.
fn backend_for(h: &mut Harness, client: [u8; 4], sport: u16, flags: Tcp) -> [u8; 4] {
    let (action, out) = h.run(&tcp(ip(client, VIP), sport, 8080, flags));
    assert_eq!(action, TC_ACT_REDIRECT);
    out[30..34].try_into().unwrap()
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    let b = |last| ([198, 18, 1, last], 80);
    let mut sticky = service_port(VIP, 8080, Protocol::Tcp, &[b(11), b(12), b(13)]);
    sticky.affinity_timeout = 600;
    let mut h = Harness::new(&model(vec![sticky.clone()]));

    let first = backend_for(&mut h, CLIENT, 30000, Tcp::Syn);
    for sport in 30001..30050 {
        assert_eq!(
            backend_for(&mut h, CLIENT, sport, Tcp::Syn),
            first,
            "new connection {sport} left the client's backend"
        );
    }
    // Other clients are still spread over all backends.
    let others: BTreeSet<[u8; 4]> = (1..=60u8)
        .map(|c| backend_for(&mut h, [198, 18, 3, c], 30000, Tcp::Syn))
        .collect();
    assert_eq!(others.len(), 3, "{others:?}");

    // The client's backend leaves the service: the client moves, and sticks again.
    sticky.endpoints.retain(|e| e.ip != v4(first));
    h.sync(&model(vec![sticky]));
    let moved = backend_for(&mut h, CLIENT, 31000, Tcp::Syn);
    assert_ne!(moved, first);
    for sport in 31001..31020 {
        assert_eq!(backend_for(&mut h, CLIENT, sport, Tcp::Syn), moved);
    }
}

#[test]
fn established_tcp_flow_keeps_its_backend_after_it_leaves_the_service() {
    let b = |last| ([198, 18, 1, last], 80);
    let three = model(vec![service_port(VIP, 8080, Protocol::Tcp, &[b(11), b(12), b(13)])]);
    let mut h = Harness::new(&three);

    let first = backend_of(&mut h, 45000, Tcp::Syn);
    let others: Vec<_> = [11, 12, 13].into_iter().filter(|&l| l != first[3]).collect();

    // The list changes (a backend added, another removed): the flow stays.
    let changed = model(vec![service_port(
        VIP,
        8080,
        Protocol::Tcp,
        &[b(first[3]), b(others[0]), b(20)],
    )]);
    h.sync(&changed);
    for _ in 0..20 {
        assert_eq!(backend_of(&mut h, 45000, Tcp::Ack), first, "established flow moved");
    }

    // Its backend leaves the service (terminating, then removed from the
    // slice): the connection keeps reaching it, both directions, exactly
    // translated, as nf_conntrack keeps a removed endpoint's flows.
    let without = model(vec![service_port(VIP, 8080, Protocol::Tcp, &[b(others[0]), b(20)])]);
    h.sync(&without);
    for _ in 0..5 {
        check(
            &mut h,
            Case {
                name: "forward packet of the flow still goes to the retired backend",
                input: tcp(ip(CLIENT, VIP), 45000, 8080, Tcp::Ack),
                expect: Expect::Rewritten(tcp(ip(CLIENT, first).forwarded(), 45000, 80, Tcp::Ack)),
            },
        );
        check(
            &mut h,
            Case {
                name: "the retired backend's reply still comes from the VIP",
                input: tcp(ip(first, CLIENT), 80, 45000, Tcp::Ack),
                expect: Expect::Rewritten(tcp(ip(VIP, CLIENT).forwarded(), 8080, 45000, Tcp::Ack)),
            },
        );
    }
    // New flows never pick it.
    let picked: BTreeSet<[u8; 4]> = (46000..46100)
        .map(|sport| backend_of(&mut h, sport, Tcp::Syn))
        .collect();
    assert_eq!(
        picked,
        BTreeSet::from([[198, 18, 1, others[0]], [198, 18, 1, 20]]),
        "new flows over the live backends only"
    );
    // A TCP flow is never cleared by the UDP cleanup.
    let stale = h.syncer.take_stale_udp_flows();
    assert!(stale.is_empty(), "no UDP port: {stale:?}");
    assert_eq!(backend_of(&mut h, 45000, Tcp::Ack), first);

    // The connection closes (FIN both ways); the client opens a new one
    // from the same port: a new flow, on a live backend.
    assert_eq!(backend_of(&mut h, 45000, Tcp::FinAck), first);
    let (action, _) = h.run(&tcp(ip(first, CLIENT), 80, 45000, Tcp::FinAck));
    assert_eq!(action, TC_ACT_REDIRECT, "the backend's FIN goes back");
    let reopened = backend_of(&mut h, 45000, Tcp::Syn);
    assert!(
        reopened == [198, 18, 1, others[0]] || reopened == [198, 18, 1, 20],
        "a SYN on the closed flow's tuple went to {reopened:?}"
    );
}

#[test]
fn new_flows_spread_over_all_backends() {
    let b = |last| ([198, 18, 1, last], 80);
    let mut h = Harness::new(&model(vec![service_port(
        VIP,
        8080,
        Protocol::Tcp,
        &[b(11), b(12), b(13)],
    )]));
    let mut counts = std::collections::BTreeMap::new();
    for sport in 20000..20300 {
        *counts.entry(backend_of(&mut h, sport, Tcp::Syn)[3]).or_insert(0u32) += 1;
    }
    let seen: BTreeSet<u8> = counts.keys().copied().collect();
    assert_eq!(seen, BTreeSet::from([11, 12, 13]), "{counts:?}");
    for (backend, n) in &counts {
        assert!(*n >= 45, "backend .{backend} got {n} of 300 new flows: {counts:?}");
    }
    // Per-service and per-backend counters saw every packet.
    let total: u64 = (1..4)
        .map(|id| h.datapath.maps.backend_counter(id).unwrap().packets)
        .sum();
    assert_eq!(total, 300);
    assert_eq!(h.datapath.maps.service_counter(1).unwrap().packets, 300);
}

/// kube-proxy's CleanStaleEntries: a UDP flow stays on an endpoint while it
/// is *serving* (terminating included), and is cleared the moment it stops
/// serving, so its next datagram goes to a serving endpoint.
#[test]
fn udp_flows_stay_while_their_endpoint_serves_and_move_when_it_stops() {
    let b = |last| ([198, 18, 1, last], 5353);
    let mut dns = service_port(UDP_VIP, 53, Protocol::Udp, &[b(11), b(12)]);
    let mut h = Harness::new(&model(vec![dns.clone()]));
    // What the agent's sync loop does after each sync.
    let sync = |h: &mut Harness, sp: &ServicePort| -> usize {
        h.sync(&model(vec![sp.clone()]));
        let stale = h.syncer.take_stale_udp_flows();
        h.datapath.maps.clear_stale_udp_flows(&stale).unwrap()
    };
    let send = |h: &mut Harness| -> [u8; 4] {
        let (action, out) = h.run(&udp(ip(CLIENT, UDP_VIP), 50000, 53));
        assert_eq!(action, TC_ACT_REDIRECT);
        out[30..34].try_into().unwrap()
    };
    let first = send(&mut h);
    assert_eq!(send(&mut h), first, "the UDP flow sticks to its backend");

    // Terminating but serving: no longer chosen for new flows, and the
    // flow keeps it.
    dns.endpoints.retain(|e| e.ip != v4(first));
    assert_eq!(sync(&mut h, &dns), 0, "nothing cleared while the endpoint serves");
    assert_eq!(send(&mut h), first, "the flow stays on its terminating endpoint");

    // It stops serving (gone from the slice): both entries are cleared
    // and the flow moves at once.
    dns.udp_serving.remove(&v4(first));
    assert_eq!(sync(&mut h, &dns), 2, "forward and reply entries of the stale flow");
    let left = lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK").unwrap();
    let first_raw = lb_agent::sync::raw_addr(v4(first));
    assert!(left.iter().all(|(_, e)| e.nat_addr != first_raw), "{left:?}");
    let other = send(&mut h);
    assert_ne!(other, first, "the flow moved to the serving backend at once");

    // No serving endpoint left at all: kube-proxy clears nothing.
    dns.endpoints.clear();
    dns.udp_serving.clear();
    assert_eq!(sync(&mut h, &dns), 0);
}

/// kube-proxy's packetFlowTest, at the kernel level: from a source to a
/// destination, which backends may answer, and does the backend see the
/// client or the node (masquerade)?
#[derive(Debug)]
enum Flow {
    /// DNATed to one of these backends; `masq`: the source became the node.
    To {
        backends: &'static [[u8; 4]],
        masq: bool,
    },
    Reject,
    Drop(DropReason),
    Untouched,
}

struct FlowCase {
    name: &'static str,
    src: [u8; 4],
    dst: [u8; 4],
    dport: u16,
    want: Flow,
}

const NODE_PORT_ADDR: [u8; 4] = [198, 18, 0, 11];
const LB_IP: [u8; 4] = [198, 19, 100, 1];
const POD_A: [u8; 4] = [198, 18, 1, 11];
const POD_B: [u8; 4] = [198, 18, 1, 12];
const SELF_VIP: [u8; 4] = [198, 19, 0, 20];

fn flow_model() -> Model {
    use lb_common::svc_flags;
    let pods: &[([u8; 4], u16)] = &[(POD_A, 80), (POD_B, 80)];
    let mut cluster_ip = service_port(VIP, 8080, Protocol::Tcp, pods);
    cluster_ip.flags = svc_flags::SNAT_OUTSIDE_CLUSTER;
    let mut node_port = service_port(NODE_PORT_ADDR, 30080, Protocol::Tcp, pods);
    node_port.flags = svc_flags::SNAT_ALWAYS;
    let mut local_node_port = service_port(NODE_PORT_ADDR, 30081, Protocol::Tcp, &[(POD_A, 80)]);
    local_node_port.flags = 0; // externalTrafficPolicy Local: client kept
    let mut lb = service_port(LB_IP, 80, Protocol::Tcp, pods);
    lb.flags = svc_flags::SNAT_ALWAYS | svc_flags::SOURCE_RANGES;
    lb.source_ranges = vec!["198.18.2.0/24".parse().unwrap()];
    let empty = service_port([198, 19, 0, 12], 80, Protocol::Tcp, &[]);
    let mut only_a = service_port(SELF_VIP, 8080, Protocol::Tcp, &[(POD_A, 80)]);
    only_a.flags = svc_flags::SNAT_OUTSIDE_CLUSTER;
    let mut m = model(vec![cluster_ip, node_port, local_node_port, lb, empty, only_a]);
    m.cluster_ips = [VIP, [198, 19, 0, 12]].into_iter().map(v4).collect();
    m
}

#[test]
fn packet_flows_like_kube_proxy() {
    let mut h = Harness::new(&flow_model());
    h.datapath
        .maps
        .set_cidrs(&[
            ("198.18.1.0/24".parse().unwrap(), lb_common::cidr_kind::CLUSTER),
            ("198.19.0.0/16".parse().unwrap(), lb_common::cidr_kind::SERVICE),
        ])
        .unwrap();
    let both: &'static [[u8; 4]] = &[POD_A, POD_B];
    let cases = [
        FlowCase {
            name: "pod → ClusterIP: pod source kept",
            src: [198, 18, 1, 50],
            dst: VIP,
            dport: 8080,
            want: Flow::To {
                backends: both,
                masq: false,
            },
        },
        FlowCase {
            name: "outside cluster CIDR → ClusterIP: masqueraded",
            src: CLIENT,
            dst: VIP,
            dport: 8080,
            want: Flow::To {
                backends: both,
                masq: true,
            },
        },
        FlowCase {
            name: "hairpin: pod → its own service → itself is masqueraded",
            src: POD_A,
            dst: SELF_VIP,
            dport: 8080,
            want: Flow::To {
                backends: &[POD_A],
                masq: true,
            },
        },
        FlowCase {
            name: "external → NodePort (eTP Cluster): masqueraded",
            src: CLIENT,
            dst: NODE_PORT_ADDR,
            dport: 30080,
            want: Flow::To {
                backends: both,
                masq: true,
            },
        },
        FlowCase {
            name: "external → NodePort (eTP Local): client kept, local endpoint only",
            src: CLIENT,
            dst: NODE_PORT_ADDR,
            dport: 30081,
            want: Flow::To {
                backends: &[POD_A],
                masq: false,
            },
        },
        FlowCase {
            name: "LB IP from an allowed source range",
            src: CLIENT,
            dst: LB_IP,
            dport: 80,
            want: Flow::To {
                backends: both,
                masq: true,
            },
        },
        FlowCase {
            name: "LB IP from outside loadBalancerSourceRanges",
            src: [198, 18, 3, 10],
            dst: LB_IP,
            dport: 80,
            want: Flow::Drop(DropReason::SourceRange),
        },
        FlowCase {
            name: "service without endpoints: REJECT",
            src: CLIENT,
            dst: [198, 19, 0, 12],
            dport: 80,
            want: Flow::Reject,
        },
        FlowCase {
            name: "ClusterIP on a port the service lacks: REJECT",
            src: CLIENT,
            dst: VIP,
            dport: 9999,
            want: Flow::Reject,
        },
        FlowCase {
            name: "unallocated address in the service range: DROP",
            src: CLIENT,
            dst: [198, 19, 9, 9],
            dport: 80,
            want: Flow::Drop(DropReason::UnallocatedServiceIp),
        },
        FlowCase {
            name: "node address on a port without NodePort: untouched",
            src: CLIENT,
            dst: NODE_PORT_ADDR,
            dport: 22,
            want: Flow::Untouched,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let sport = 41000 + i as u16;
        let input = tcp(ip(c.src, c.dst), sport, c.dport, Tcp::Syn);
        let before = match &c.want {
            Flow::Drop(r) => h.drops(*r),
            Flow::Reject => h.drops(DropReason::Rejected),
            _ => 0,
        };
        let (action, out) = h.run(&input);
        match &c.want {
            Flow::To { backends, masq } => {
                assert_eq!(action, TC_ACT_REDIRECT, "{}", c.name);
                let dst: [u8; 4] = out[30..34].try_into().unwrap();
                let src: [u8; 4] = out[26..30].try_into().unwrap();
                let sport_out = u16::from_be_bytes([out[34], out[35]]);
                assert!(backends.contains(&dst), "{}: went to {dst:?}", c.name);
                if *masq {
                    assert_eq!(src, NODE_ADDR, "{}: source not masqueraded", c.name);
                    assert!(
                        lb_common::conntrack::snat_ports::contains(sport_out),
                        "{}: port {sport_out}",
                        c.name
                    );
                } else {
                    assert_eq!((src, sport_out), (c.src, sport), "{}: source changed", c.name);
                }
                // Exactly what a correct NAT produces (checksums included).
                let want = tcp(ip(src, dst).forwarded(), sport_out, 80, Tcp::Syn);
                assert_eq!(hex(&out), hex(&want), "{}", c.name);

                // The reply goes back as from the address the client used.
                let reply = tcp(ip(dst, src), 80, sport_out, Tcp::SynAck);
                let (action, back) = h.run(&reply);
                assert_eq!(action, TC_ACT_REDIRECT, "{}: reply", c.name);
                let want = tcp(ip(c.dst, c.src).forwarded(), c.dport, sport, Tcp::SynAck);
                assert_eq!(hex(&back), hex(&want), "{}: reply", c.name);
            }
            Flow::Reject => {
                assert_eq!(action, TC_ACT_REDIRECT, "{}", c.name);
                assert_eq!(hex(&out), hex(&port_unreachable_for(&input)), "{}", c.name);
                assert_eq!(h.drops(DropReason::Rejected), before + 1, "{}", c.name);
            }
            Flow::Drop(reason) => {
                assert_eq!(action, TC_ACT_SHOT, "{}", c.name);
                assert_eq!(h.drops(*reason), before + 1, "{}", c.name);
            }
            Flow::Untouched => {
                assert_eq!(action, TC_ACT_OK, "{}", c.name);
                assert_eq!(hex(&out), hex(&input), "{}", c.name);
            }
        }
    }
}

/// An ICMP error (`icmp_type`) from `src` to `dst`, quoting `quoted`.
fn icmp_error(src: [u8; 4], dst: [u8; 4], icmp_type: etherparse::Icmpv4Type, quoted: &[u8], ttl: u8) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, ttl, etherparse::IpNumber::ICMP, src, dst).unwrap();
    h.dont_fragment = false;
    h.identification = 7;
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .icmpv4(icmp_type);
    let mut out = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut out, quoted).unwrap();
    out
}

/// `quoted` (an IPv4 header without options + 8 bytes of L4) with new
/// addresses and ports and a correct header checksum.
fn requote(quoted: &[u8], src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut q = quoted.to_vec();
    q[12..16].copy_from_slice(&src);
    q[16..20].copy_from_slice(&dst);
    q[20..22].copy_from_slice(&sport.to_be_bytes());
    q[22..24].copy_from_slice(&dport.to_be_bytes());
    q[10..12].copy_from_slice(&[0, 0]);
    let sum: u32 = q[..20].chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
    let folded = ((sum & 0xffff) + (sum >> 16)) as u16;
    q[10..12].copy_from_slice(&(!folded).to_be_bytes());
    q
}

#[test]
fn icmp_errors_about_nated_flows_are_translated_back() {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let mut h = Harness::new(&flow_model());
    let mut udp_model = flow_model();
    udp_model
        .services
        .extend(model(vec![service_port(UDP_VIP, 53, Protocol::Udp, &[(UDP_BACKEND, 5353)])]).services);
    h.sync(&udp_model);

    // Not masqueraded: UDP to a ClusterIP, the backend answers "port unreachable".
    let (_, to_backend) = h.run(&udp(ip(CLIENT, UDP_VIP), 50100, 53));
    let quoted = &to_backend[14..14 + 28];
    let error = icmp_error(
        UDP_BACKEND,
        CLIENT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        quoted,
        64,
    );
    let (action, out) = h.run(&error);
    assert_eq!(action, TC_ACT_REDIRECT);
    let want = icmp_error(
        UDP_VIP,
        CLIENT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &requote(quoted, CLIENT, 50100, UDP_VIP, 53),
        63,
    );
    assert_eq!(
        hex(&out),
        hex(&want),
        "error from the backend comes from the ClusterIP, quoting the client's packet"
    );

    // Masqueraded: a NodePort flow; a router on the way needs fragmentation.
    let (_, to_backend) = h.run(&tcp(ip(CLIENT, NODE_PORT_ADDR), 43000, 30080, Tcp::Ack));
    let backend: [u8; 4] = to_backend[30..34].try_into().unwrap();
    let quoted = &to_backend[14..14 + 28];
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let router = [198, 18, 1, 1];
    let error = icmp_error(router, NODE_ADDR, frag_needed.clone(), quoted, 64);
    let (action, out) = h.run(&error);
    assert_eq!(action, TC_ACT_REDIRECT);
    let want = icmp_error(
        router,
        CLIENT,
        frag_needed,
        &requote(quoted, CLIENT, 43000, NODE_PORT_ADDR, 30080),
        63,
    );
    assert_eq!(
        hex(&out),
        hex(&want),
        "PMTU error reaches the client about its own packet (backend {backend:?})"
    );

    // ICMP that is not about one of our flows passes untouched.
    let stray = icmp_error(
        router,
        CLIENT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &requote(quoted, CLIENT, 1, router, 2),
        64,
    );
    let (action, out) = h.run(&stray);
    assert_eq!((action, hex(&out)), (TC_ACT_OK, hex(&stray)));
}

/// Deterministic xorshift: the fuzz run is repeatable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A plausible packet to start from: to frontends, to cluster IPs on other
/// ports, to random addresses, replies from backends, ICMP errors.
fn fuzz_template(rng: &mut Rng) -> Vec<u8> {
    if rng.below(4) == 0 {
        return fuzz_template6(rng);
    }
    let addrs = [
        VIP,
        UDP_VIP,
        NODE_PORT_ADDR,
        LB_IP,
        SELF_VIP,
        POD_A,
        POD_B,
        CLIENT,
        NODE_ADDR,
        [198, 19, 0, 12],
        [198, 19, 9, 9],
    ];
    let ports = [8080, 53, 30080, 30081, 80, 9999, 61000, 40000];
    let (src, mut dst) = (*rng.pick(&addrs), *rng.pick(&addrs));
    let (sport, mut dport) = (*rng.pick(&ports), *rng.pick(&ports));
    if rng.below(2) == 0 {
        // Half of them aimed at a real frontend.
        (dst, dport) = *rng.pick(&[
            (VIP, 8080),
            (NODE_PORT_ADDR, 30080),
            (NODE_PORT_ADDR, 30081),
            (LB_IP, 80),
            (SELF_VIP, 8080),
        ]);
    }
    let flags = *rng.pick(&[Tcp::Syn, Tcp::SynAck, Tcp::Ack]);
    let mut ip_hdr = ip(src, dst);
    if rng.below(8) == 0 {
        ip_hdr.options = &[1, 1, 1, 0];
    }
    match rng.below(5) {
        0 | 1 => tcp(ip_hdr, sport, dport, flags),
        2 => udp(ip_hdr, sport, dport),
        3 => {
            if rng.below(2) == 0 {
                (ip_hdr.dst, dport) = *rng.pick(&[
                    (SCTP_VIP, SCTP_PORT),
                    (SCTP_VIP, SCTP_SAME_PORT),
                    (NODE_PORT_ADDR, SCTP_NODE_PORT),
                ]);
            }
            sctp(ip_hdr, sport, dport, fuzz_chunk(rng))
        }
        _ => {
            let quoted = tcp(ip(dst, src), dport, sport, flags);
            icmp_error(
                src,
                dst,
                etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
                &quoted[14..14 + 28],
                64,
            )
        }
    }
}

/// IPv6 packets: to frontends or not, with extension headers or fragment
/// headers now and then.
fn fuzz_template6(rng: &mut Rng) -> Vec<u8> {
    let addrs = [CLIENT6, VIP6, BACKEND6, NODE_ADDR6, v6(0x19, 0, 0x12)];
    let ports = [8080, 53, 30080, 80, 40000];
    let (src, mut dst) = (*rng.pick(&addrs), *rng.pick(&addrs));
    let (sport, mut dport) = (*rng.pick(&ports), *rng.pick(&ports));
    if rng.below(2) == 0 {
        (dst, dport) = *rng.pick(&[(VIP6, 8080), (VIP6, 53), (NODE_ADDR6, 30080)]);
    }
    let mut ip_hdr = ip6(src, dst);
    match rng.below(8) {
        0 | 1 => ip_hdr = ip_hdr.with_options(),
        2 => ip_hdr = ip_hdr.fragment(rng.below(3) as u16 * 8, rng.below(2) == 0),
        _ => {}
    }
    let flags = *rng.pick(&[Tcp::Syn, Tcp::SynAck, Tcp::Ack]);
    match rng.below(4) {
        0 => udp6(ip_hdr, sport, dport),
        1 => {
            if rng.below(2) == 0 {
                (ip_hdr.dst, dport) = *rng.pick(&[(VIP6, SCTP_PORT), (NODE_ADDR6, SCTP_NODE_PORT)]);
            }
            sctp6(ip_hdr, sport, dport, fuzz_chunk(rng))
        }
        _ => tcp6(ip_hdr, sport, dport, flags),
    }
}

fn fuzz_chunk(rng: &mut Rng) -> Chunk {
    *rng.pick(&[Chunk::Init, Chunk::InitAck, Chunk::Data, Chunk::Abort])
}

/// Breaks a packet the ways the wild does.
fn fuzz_mutate(rng: &mut Rng, mut pkt: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.below(4) {
        match rng.below(9) {
            0 => pkt.truncate(34 + rng.below(pkt.len().saturating_sub(34) as u64 + 1) as usize),
            1 => pkt[14] = 0x40 | rng.below(16) as u8, // any IHL
            2 => pkt[20] |= 0x20,                      // more fragments
            3 => pkt[21] = rng.next() as u8,           // fragment offset bits
            4 => {
                let at = rng.below(pkt.len() as u64) as usize;
                pkt[at] = rng.next() as u8; // any byte, checksums included
            }
            5 => {
                // A VLAN tag in front of the IP header.
                let tag = [0x81, 0x00, 0x00, 0x64];
                pkt.splice(12..12, tag);
            }
            6 => {
                // IPv6 with extension headers (hop-by-hop, routing) behind.
                pkt[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                pkt[14] = 0x60;
                pkt[20] = 0; // next header: hop-by-hop
            }
            7 => pkt[23] = *rng.pick(&[1u8, 6, 17, 132, 47, 0]), // protocol
            _ => pkt.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        }
    }
    pkt
}

#[test]
fn fuzzed_packets_never_go_astray_and_every_drop_is_counted() {
    let mut model = flow_model();
    for other in [model6(), sctp_model()] {
        model.services.extend(other.services);
        model.cluster_ips.extend(other.cluster_ips);
    }
    let mut h = Harness::new(&model);
    h.datapath
        .maps
        .set_cidrs(&[
            ("198.18.1.0/24".parse().unwrap(), lb_common::cidr_kind::CLUSTER),
            ("198.19.0.0/16".parse().unwrap(), lb_common::cidr_kind::SERVICE),
        ])
        .unwrap();
    let total_drops = |h: &Harness| -> u64 { DropReason::ALL.iter().map(|r| h.drops(*r)).sum() };
    let dev = h.prepare_xdp();
    let mut rng = Rng(0x5eed_1b0a_d5ee_d001);
    let (mut runs, mut refused, mut dropped, mut translated) = (0u32, 0u32, 0u32, 0u32);
    let mut sctp_translated = 0u32;
    for i in 0..100_000u32 {
        let template = fuzz_template(&mut rng);
        // The XDP path first (as on an external interface): any verdict,
        // but every drop counted.
        if i % 2 == 0 && template.len() >= 14 {
            let before = total_drops(&h);
            let (action, _) = h.run_xdp(dev, &fuzz_mutate(&mut rng, template.clone()));
            match action {
                XDP_DROP => assert_eq!(
                    total_drops(&h),
                    before + 1,
                    "packet {i}: an XDP drop without a counted reason"
                ),
                XDP_PASS | XDP_REDIRECT => {}
                other => panic!("packet {i}: XDP verdict {other}"),
            }
        }
        let pkt = fuzz_mutate(&mut rng, template);
        let before = total_drops(&h);
        let mut out = vec![0u8; pkt.len() + 256];
        let prog = h.datapath.ingress_program().unwrap();
        let result = prog.test_run(TestRunOptions {
            data_in: Some(&pkt),
            data_out: Some(&mut out),
            ..Default::default()
        });
        let Ok(r) = result else {
            // The kernel refuses some inputs (shorter than an IP header...)
            // before the program runs.
            refused += 1;
            continue;
        };
        runs += 1;
        out.truncate(r.data_size_out as usize);
        match r.return_value {
            TC_ACT_SHOT => {
                dropped += 1;
                assert_eq!(
                    total_drops(&h),
                    before + 1,
                    "packet {i}: a drop without a counted reason: {}",
                    hex(&pkt)
                );
            }
            TC_ACT_OK | TC_ACT_REDIRECT => {}
            other => panic!("packet {i}: verdict {other}"),
        }
        // A packet sent on to a frontend's port must go to one of its
        // backends (checked where the L4 header follows the IP header).
        let ipv4 = pkt.len() >= 34 && pkt[12..14] == [0x08, 0x00] && pkt[14] == 0x45;
        let ipv6 = pkt.len() >= 58 && pkt[12..14] == [0x86, 0xdd] && pkt[14] >> 4 == 6;
        let (l4_at, dst_at, l4_off) = if ipv6 { (20, 38..54, 54) } else { (23, 30..34, 34) };
        let l4 = pkt.get(l4_at).copied().unwrap_or(0);
        if r.return_value == TC_ACT_REDIRECT
            && (ipv4 || ipv6)
            && out.len() >= l4_off + 4
            && out[l4_at] == l4
            && (l4 == 6 || l4 == 17 || l4 == 132)
        {
            let addr = |b: &[u8]| -> std::net::IpAddr {
                match b.len() {
                    4 => v4(b.try_into().unwrap()),
                    _ => Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()).into(),
                }
            };
            let dport = u16::from_be_bytes([pkt[l4_off + 2], pkt[l4_off + 3]]);
            let proto = match l4 {
                6 => Protocol::Tcp,
                17 => Protocol::Udp,
                _ => Protocol::Sctp,
            };
            let frontend = Frontend::new(addr(&pkt[dst_at.clone()]), dport, proto);
            if let Some(sp) = model.services.get(&frontend) {
                let to = Endpoint {
                    ip: addr(&out[dst_at]),
                    port: u16::from_be_bytes([out[l4_off + 2], out[l4_off + 3]]),
                };
                assert!(
                    sp.endpoints.contains(&to),
                    "packet {i} to {frontend} went to {to}: {}",
                    hex(&pkt)
                );
                if l4 == 132 && sctp_crc_valid(&pkt) {
                    assert!(sctp_crc_valid(&out), "packet {i}: CRC32c spoilt: {}", hex(&pkt));
                    sctp_translated += 1;
                }
                translated += 1;
            }
        }
    }
    eprintln!(
        "fuzz: {runs} runs ({refused} refused by the kernel), {dropped} dropped (all counted), {translated} balanced ({sctp_translated} SCTP with a valid CRC32c)"
    );
    assert!(
        runs > 90_000 && dropped > 1_000 && translated > 1_000 && sctp_translated > 100,
        "the fuzz mix exercised too little"
    );
}

#[test]
fn conntrack_lifetimes_follow_the_config_and_gc_removes_expired_entries() {
    let mut h = Harness::new(&default_model());
    h.datapath
        .maps
        .set_conntrack_timeouts(&ConntrackTimeouts {
            tcp_syn: 5,
            tcp_established: 700,
            tcp_closing: 3,
            udp: 9,
            ..Default::default()
        })
        .unwrap();
    let now = lb_agent::run::monotonic_secs();
    h.run(&udp(ip(CLIENT, UDP_VIP), 50200, 53));
    h.run(&tcp(ip(CLIENT, VIP), 44000, 8080, Tcp::Syn));
    h.run(&tcp(ip(CLIENT, VIP), 44001, 8080, Tcp::Ack));
    let lifetimes: Vec<(u8, u16, u32)> = lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.kind == lb_common::CtKind::Forward as u8)
        .map(|(k, e)| (k.proto, k.src_port, e.expires_at - now))
        .collect();
    let ttl = |proto: u8, sport: u16| lifetimes.iter().find(|l| l.0 == proto && l.1 == sport).unwrap().2;
    assert!((9..=10).contains(&ttl(17, 50200)), "UDP: {lifetimes:?}");
    assert!((5..=6).contains(&ttl(6, 44000)), "TCP SYN: {lifetimes:?}");
    assert!((700..=701).contains(&ttl(6, 44001)), "TCP established: {lifetimes:?}");

    // GC at a later time removes what expired by then, keeps the rest.
    let removed = h.datapath.maps.purge_expired_conntrack(now + 100).unwrap();
    assert_eq!(removed, 4, "UDP and SYN flows, both directions");
    let left = lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK").unwrap();
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|(_, e)| e.expires_at >= now + 100));
}

/// nf_conntrack's states as kube-proxy tunes them, per flow: both entries
/// (forward and reply) carry the flow's lifetime, whichever direction
/// the last packet took.
#[test]
fn conntrack_lifetime_follows_the_flow_state_in_both_entries() {
    let mut h = Harness::new(&default_model());
    h.datapath
        .maps
        .set_conntrack_timeouts(&ConntrackTimeouts {
            tcp_syn: 5,
            tcp_established: 700,
            tcp_close_wait: 300,
            tcp_closing: 3,
            udp: 9,
            udp_stream: 40,
        })
        .unwrap();
    #[derive(Clone, Copy, Debug)]
    enum P {
        /// Client → service.
        C(Tcp),
        /// Backend → client.
        B(Tcp),
        Cu,
        Bu,
    }
    use P::*;
    // (name, client port, packets in order, wanted lifetime of both entries)
    let cases: &[(&str, u16, &[P], u32)] = &[
        ("UDP without reply: --conntrack-udp-timeout", 51000, &[Cu], 9),
        (
            "UDP after a reply: --conntrack-udp-timeout-stream",
            51001,
            &[Cu, Bu],
            40,
        ),
        ("UDP stream, client sends again", 51002, &[Cu, Bu, Cu], 40),
        ("UDP, several requests, no reply yet", 51003, &[Cu, Cu], 9),
        ("TCP SYN only", 45000, &[C(Tcp::Syn)], 5),
        (
            "TCP handshake done: established",
            45001,
            &[C(Tcp::Syn), B(Tcp::SynAck), C(Tcp::Ack)],
            700,
        ),
        (
            "TCP FIN from the client only: close-wait",
            45002,
            &[C(Tcp::Syn), B(Tcp::SynAck), C(Tcp::Ack), C(Tcp::FinAck)],
            300,
        ),
        (
            "TCP FIN from the backend only: close-wait",
            45003,
            &[C(Tcp::Syn), B(Tcp::SynAck), C(Tcp::Ack), B(Tcp::FinAck), C(Tcp::Ack)],
            300,
        ),
        (
            "TCP FIN from both sides: closing",
            45004,
            &[
                C(Tcp::Syn),
                B(Tcp::SynAck),
                C(Tcp::Ack),
                C(Tcp::FinAck),
                B(Tcp::FinAck),
                C(Tcp::Ack),
            ],
            3,
        ),
        (
            "TCP RST from the backend: closing",
            45005,
            &[C(Tcp::Syn), B(Tcp::SynAck), C(Tcp::Ack), B(Tcp::Rst)],
            3,
        ),
    ];
    let now = lb_agent::run::monotonic_secs();
    for &(name, sport, packets, _) in cases {
        for p in packets {
            let pkt = match *p {
                C(flags) => tcp(ip(CLIENT, VIP), sport, 8080, flags),
                B(flags) => tcp(ip(BACKEND, CLIENT), 80, sport, flags),
                Cu => udp(ip(CLIENT, UDP_VIP), sport, 53),
                Bu => udp(ip(UDP_BACKEND, CLIENT), 5353, sport),
            };
            let (action, _) = h.run(&pkt);
            assert_eq!(action, TC_ACT_REDIRECT, "{name}: {p:?} translated");
        }
    }
    let entries = lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK").unwrap();
    for &(name, sport, _, want) in cases {
        let entry = |kind: lb_common::CtKind| {
            let (k, e) = entries
                .iter()
                .find(|(k, _)| {
                    k.kind == kind as u8
                        && (if kind == lb_common::CtKind::Forward {
                            k.src_port
                        } else {
                            k.dst_port
                        }) == sport
                })
                .unwrap_or_else(|| panic!("{name}: no {kind:?} entry"));
            (k, e)
        };
        // The state `lb-agent conntrack` shows: the timeouts above are distinct.
        let state = match want {
            5 => "SYN_SENT",
            700 => "ESTABLISHED",
            300 => "CLOSE_WAIT",
            3 => "CLOSING",
            9 => "UNREPLIED",
            _ => "ASSURED",
        };
        for kind in [lb_common::CtKind::Forward, lb_common::CtKind::Reply] {
            let (key, e) = entry(kind);
            let got = e.expires_at - now;
            assert!(
                (want..=want + 1).contains(&got),
                "{name}: {kind:?} entry lives {got}s, want {want}s"
            );
            assert_eq!(
                lb_common::CtState::of_entry(key.proto, e).name(),
                state,
                "{name}: {kind:?}"
            );
        }
    }
}

/// A masqueraded flow's reply entry is keyed on the node's address and
/// port: the "replied" state still reaches the forward entry (and the
/// forward path still refreshes the reply entry).
#[test]
fn masqueraded_udp_flow_becomes_a_stream_in_both_entries() {
    let mut node_port = service_port(NODE_PORT_ADDR, 30053, Protocol::Udp, &[(POD_A, 5353)]);
    node_port.flags = lb_common::svc_flags::SNAT_ALWAYS;
    let mut h = Harness::new(&model(vec![node_port]));
    h.datapath
        .maps
        .set_conntrack_timeouts(&ConntrackTimeouts {
            udp: 9,
            udp_stream: 40,
            ..Default::default()
        })
        .unwrap();
    let now = lb_agent::run::monotonic_secs();
    let lifetimes = |h: &Harness| {
        let mut l: Vec<(u8, u32)> = lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK")
            .unwrap()
            .into_iter()
            .map(|(k, e)| (k.kind, e.expires_at - now))
            .collect();
        l.sort();
        l
    };
    let (action, out) = h.run(&udp(ip(CLIENT, NODE_PORT_ADDR), 52000, 30053));
    assert_eq!(action, TC_ACT_REDIRECT);
    let (node_addr, snat_port) = (
        <[u8; 4]>::try_from(&out[26..30]).unwrap(),
        u16::from_be_bytes([out[34], out[35]]),
    );
    assert_eq!(node_addr, NODE_ADDR, "masqueraded as the node");
    let ttls = lifetimes(&h);
    assert!(ttls.iter().all(|(_, t)| (9..=10).contains(t)), "no reply yet: {ttls:?}");
    let (action, out) = h.run(&udp(ip(POD_A, NODE_ADDR), 5353, snat_port));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &CLIENT, "the reply goes back to the client");
    let ttls = lifetimes(&h);
    assert_eq!(ttls.len(), 2, "{ttls:?}");
    assert!(
        ttls.iter().all(|(_, t)| (40..=41).contains(t)),
        "after the reply: {ttls:?}"
    );
}

#[test]
fn a_full_conntrack_table_still_balances_new_flows() {
    let b = |last| ([198, 18, 1, last], 80);
    let mut h = Harness::with_conntrack(
        &model(vec![service_port(VIP, 8080, Protocol::Tcp, &[b(11), b(12)])]),
        64,
    );
    for sport in 20000..20500 {
        let (action, out) = h.run(&tcp(ip(CLIENT, VIP), sport, 8080, Tcp::Syn));
        assert_eq!(action, TC_ACT_REDIRECT, "flow {sport} with a full table");
        assert!([[198, 18, 1, 11], [198, 18, 1, 12]].contains(&<[u8; 4]>::try_from(&out[30..34]).unwrap()));
    }
    let entries = lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK")
        .unwrap()
        .len();
    assert!(entries <= 64, "LRU holds at most its size: {entries}");
    assert_eq!(DropReason::ALL.iter().map(|r| h.drops(*r)).sum::<u64>(), 0, "no drop");

    // Evictions become visible when an evicted flow sends again: the
    // newest flow still has its entry (not counted), the first one lost it
    // (counted, and balanced anew rather than dropped).
    let misses = |h: &Harness| h.datapath.maps.events(FlowEvent::TcpMidFlowConntrackMiss).unwrap();
    let (action, _) = h.run(&tcp(ip(CLIENT, VIP), 20499, 8080, Tcp::Ack));
    assert_eq!(
        (action, misses(&h)),
        (TC_ACT_REDIRECT, 0),
        "the newest flow kept its entry"
    );
    let (action, out) = h.run(&tcp(ip(CLIENT, VIP), 20000, 8080, Tcp::Ack));
    assert_eq!(
        (action, misses(&h)),
        (TC_ACT_REDIRECT, 1),
        "the evicted flow is counted"
    );
    assert!([[198, 18, 1, 11], [198, 18, 1, 12]].contains(&<[u8; 4]>::try_from(&out[30..34]).unwrap()));
}

#[test]
fn full_service_table_names_the_flag_and_the_other_services_keep_working() {
    let netns = enter_test_netns();
    let opts = LoadOptions {
        max_services: 4,
        max_backends: 16,
        ..LoadOptions::new(None, 4096)
    };
    let datapath = Datapath::load(&opts).expect("loading the datapath");
    let mut h = Harness {
        datapath,
        syncer: Syncer::with_limits(4, 16),
        netns,
    };
    let vip = |last| [198, 19, 0, last];
    let ports: Vec<ServicePort> = (1..=5)
        .map(|i| service_port(vip(100 + i), 80, Protocol::Tcp, &[([198, 18, 1, 10 + i], 80)]))
        .collect();
    let err = h
        .syncer
        .sync(&mut h.datapath.maps, &model(ports))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--max-services"), "{err}");
    // The service ports that fit are programmed and work.
    let (action, out) = h.run(&tcp(ip(CLIENT, vip(101)), 45000, 80, Tcp::Syn));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &[198, 18, 1, 11]);
}

#[test]
fn maglev_keeps_flows_on_their_backend_even_without_conntrack() {
    let b = |last| ([198, 18, 1, last], 80);
    let maglev = |backends: &[([u8; 4], u16)]| {
        let mut sp = service_port(VIP, 8080, Protocol::Tcp, backends);
        sp.table_size = 251;
        model(vec![sp])
    };
    let mut h = Harness::new(&maglev(&[b(11), b(12), b(13)]));
    let flows = 20000u16..20600;
    let pick = |h: &mut Harness| -> Vec<u8> { flows.clone().map(|sport| backend_of(h, sport, Tcp::Syn)[3]).collect() };
    let first = pick(&mut h);
    for last in [11, 12, 13] {
        let share = first.iter().filter(|&&x| x == last).count();
        assert!(share > 120, "backend .{last} got {share} of 600 flows");
    }
    // Conntrack forgotten: the same flows hash to the same backends.
    h.datapath.maps.purge_expired_conntrack(u32::MAX).unwrap();
    assert_eq!(pick(&mut h), first, "maglev is not a function of the flow");

    // One backend leaves: only its flows move.
    h.sync(&maglev(&[b(11), b(13)]));
    h.datapath.maps.purge_expired_conntrack(u32::MAX).unwrap();
    let after = pick(&mut h);
    let kept: Vec<_> = first.iter().zip(&after).filter(|(was, _)| **was != 12).collect();
    let moved = kept.iter().filter(|(was, now)| was != now).count();
    eprintln!(
        "maglev: removing 1 of 3 backends moved {moved} of {} other flows",
        kept.len()
    );
    assert!(
        moved * 20 < kept.len(),
        "{moved} of {} flows of surviving backends moved",
        kept.len()
    );
    assert!(after.iter().all(|&x| x != 12));
}

// ---- XDP fast path ----------------------------------------------------------

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// The test device's MAC, and the resolved neighbours behind it. POD_B has
/// no neighbour entry: XDP cannot send to it and leaves its flows to TC.
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const POD_A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];

fn xdp_model() -> Model {
    use lb_common::svc_flags;
    let mut m = Vec::new();
    for (port, protocol, flags, backends) in [
        (30080, Protocol::Tcp, svc_flags::SNAT_ALWAYS, &[(POD_A, 80)][..]),
        // externalTrafficPolicy Local: the client stays the source.
        (30081, Protocol::Tcp, 0, &[(POD_A, 80)][..]),
        (30082, Protocol::Udp, svc_flags::SNAT_ALWAYS, &[(POD_A, 5353)][..]),
        (30083, Protocol::Tcp, svc_flags::SNAT_ALWAYS, &[(POD_B, 80)][..]),
        (30084, Protocol::Tcp, svc_flags::SNAT_ALWAYS, &[][..]),
    ] {
        let mut p = service_port(NODE_PORT_ADDR, port, protocol, backends);
        p.flags = flags;
        m.push(p);
    }
    let mut lb = service_port(LB_IP, 80, Protocol::Tcp, &[(POD_A, 80)]);
    lb.flags = svc_flags::SNAT_ALWAYS | svc_flags::SOURCE_RANGES;
    lb.source_ranges = vec!["198.18.3.0/24".parse().unwrap()];
    m.push(lb);
    model(m)
}

/// As the XDP path sends it: Ethernet addresses of the next hop.
fn via(mut pkt: Vec<u8>, dst_mac: [u8; 6]) -> Vec<u8> {
    pkt[..6].copy_from_slice(&dst_mac);
    pkt[6..12].copy_from_slice(&NODE_MAC);
    pkt
}

fn mac_arg(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Harness {
    /// The test device gets a fixed MAC, the client and POD_A resolved
    /// neighbours, and becomes the XDP path's (only) egress device.
    fn prepare_xdp(&mut self) -> u32 {
        let ns = &self.netns;
        ns.ip(&["link", "set", "lbk0", "address", &mac_arg(NODE_MAC)]).unwrap();
        for (addr, mac) in [(CLIENT, CLIENT_MAC), (POD_A, POD_A_MAC)] {
            let addr = Ipv4Addr::from(addr).to_string();
            ns.ip(&[
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac_arg(mac),
                "dev",
                "lbk0",
                "nud",
                "permanent",
            ])
            .unwrap();
        }
        // SAFETY: NUL-terminated name; this thread is in the test namespace.
        let ifindex = unsafe { libc::if_nametoindex(c"lbk0".as_ptr()) };
        assert_ne!(ifindex, 0, "lbk0 missing");
        self.datapath.maps.set_xdp_egress(&[ifindex]).unwrap();
        ifindex
    }

    /// Runs `lb_xdp` on `pkt` as if received on `ifindex`.
    fn run_xdp(&mut self, ifindex: u32, pkt: &[u8]) -> (u32, Vec<u8>) {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: Vec<u8> = [0, pkt.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|w: &u32| w.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = self
            .datapath
            .xdp_program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN (xdp)");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn event(&self, event: FlowEvent) -> u64 {
        self.datapath.maps.events(event).unwrap()
    }

    fn conntrack_entries(&self) -> usize {
        lb_agent::datapath::maps::dump(&self.datapath.maps.conntrack, "CONNTRACK")
            .unwrap()
            .len()
    }
}

/// The masquerade port the node chose, read from a translated packet.
fn sport_of(pkt: &[u8]) -> u16 {
    u16::from_be_bytes([pkt[34], pkt[35]])
}

#[test]
fn xdp_translates_nodeport_flows_both_ways_and_sends_them_back_out() {
    let mut h = Harness::new(&xdp_model());
    let dev = h.prepare_xdp();
    let forwarded_before = h.event(FlowEvent::XdpForwarded);

    // externalTrafficPolicy Local: DNAT only; the reply gets the NodePort back.
    let syn = tcp(ip(CLIENT, NODE_PORT_ADDR), 40000, 30081, Tcp::Syn);
    let (action, out) = h.run_xdp(dev, &syn);
    assert_eq!(
        action, XDP_REDIRECT,
        "backend behind the ingress device: redirected back out"
    );
    assert_eq!(
        hex(&out),
        hex(&via(tcp(ip(CLIENT, POD_A).forwarded(), 40000, 80, Tcp::Syn), POD_A_MAC))
    );
    let (action, out) = h.run_xdp(dev, &tcp(ip(POD_A, CLIENT), 80, 40000, Tcp::SynAck));
    assert_eq!(action, XDP_REDIRECT, "reply");
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp(ip(NODE_PORT_ADDR, CLIENT).forwarded(), 30081, 40000, Tcp::SynAck),
            CLIENT_MAC
        ))
    );

    // eTP Cluster: masqueraded as the node, on a port of the SNAT range.
    let (action, out) = h.run_xdp(dev, &tcp(ip(CLIENT, NODE_PORT_ADDR), 40001, 30080, Tcp::Syn));
    assert_eq!(action, XDP_REDIRECT);
    let port = sport_of(&out);
    assert!(lb_common::conntrack::snat_ports::contains(port), "SNAT port {port}");
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp(ip(NODE_ADDR, POD_A).forwarded(), port, 80, Tcp::Syn),
            POD_A_MAC
        ))
    );
    let (action, out) = h.run_xdp(dev, &tcp(ip(POD_A, NODE_ADDR), 80, port, Tcp::SynAck));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp(ip(NODE_PORT_ADDR, CLIENT).forwarded(), 30080, 40001, Tcp::SynAck),
            CLIENT_MAC
        ))
    );
    // The next packet of the flow uses the same entry (and port).
    let (_, out) = h.run_xdp(dev, &tcp(ip(CLIENT, NODE_PORT_ADDR), 40001, 30080, Tcp::Ack));
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp(ip(NODE_ADDR, POD_A).forwarded(), port, 80, Tcp::Ack),
            POD_A_MAC
        ))
    );

    // UDP, with a checksum and without one (which must stay 0).
    for (sport, strip) in [(40002u16, false), (40003, true)] {
        let maybe_strip = |p: Vec<u8>| if strip { without_udp_checksum(p) } else { p };
        let (action, out) = h.run_xdp(dev, &maybe_strip(udp(ip(CLIENT, NODE_PORT_ADDR), sport, 30082)));
        assert_eq!(action, XDP_REDIRECT, "UDP {sport}");
        let port = sport_of(&out);
        let want = maybe_strip(udp(ip(NODE_ADDR, POD_A).forwarded(), port, 5353));
        assert_eq!(hex(&out), hex(&via(want, POD_A_MAC)), "UDP {sport}");
        let (_, out) = h.run_xdp(dev, &maybe_strip(udp(ip(POD_A, NODE_ADDR), 5353, port)));
        let want = maybe_strip(udp(ip(NODE_PORT_ADDR, CLIENT).forwarded(), 30082, sport));
        assert_eq!(hex(&out), hex(&via(want, CLIENT_MAC)), "UDP reply {sport}");
    }
    assert_eq!(
        h.event(FlowEvent::XdpForwarded) - forwarded_before,
        9,
        "every packet above went by XDP"
    );
}

#[test]
fn xdp_hands_what_it_cannot_finish_to_tc_untouched() {
    let mut h = Harness::new(&xdp_model());
    let dev = h.prepare_xdp();
    let passed_before = h.event(FlowEvent::XdpPassedToStack);
    let untouched = |h: &mut Harness, name: &str, pkt: &[u8]| {
        let (action, out) = h.run_xdp(dev, pkt);
        assert_eq!(action, XDP_PASS, "{name}: action");
        assert_eq!(hex(&out), hex(pkt), "{name}: packet untouched");
    };

    // Next hop not resolved: XDP passes, TC forwards with the entries XDP made.
    let to_b = tcp(ip(CLIENT, NODE_PORT_ADDR), 41000, 30083, Tcp::Syn);
    untouched(&mut h, "unresolved neighbour", &to_b);
    let entries = h.conntrack_entries();
    let (action, out) = h.run(&to_b);
    assert_eq!(action, TC_ACT_REDIRECT, "TC forwards it");
    assert_eq!(h.conntrack_entries(), entries, "TC used the flow XDP recorded");
    assert_eq!(&out[30..34], &POD_B, "to POD_B");

    // A flow TC started continues on XDP.
    let (action, _) = h.run(&tcp(ip(CLIENT, NODE_PORT_ADDR), 41001, 30081, Tcp::Syn));
    assert_eq!(action, TC_ACT_REDIRECT);
    let (action, out) = h.run_xdp(dev, &tcp(ip(CLIENT, NODE_PORT_ADDR), 41001, 30081, Tcp::Ack));
    assert_eq!(action, XDP_REDIRECT, "established by TC, continued by XDP");
    assert_eq!(
        hex(&out),
        hex(&via(tcp(ip(CLIENT, POD_A).forwarded(), 41001, 80, Tcp::Ack), POD_A_MAC))
    );

    // Egress device not in XDP_EGRESS.
    h.datapath.maps.set_xdp_egress(&[]).unwrap();
    untouched(
        &mut h,
        "egress not allowed",
        &tcp(ip(CLIENT, NODE_PORT_ADDR), 41002, 30081, Tcp::Syn),
    );
    h.datapath.maps.set_xdp_egress(&[dev]).unwrap();

    // TTL about to expire: the stack answers with ICMP time exceeded.
    let mut last_hop = ip(CLIENT, NODE_PORT_ADDR);
    last_hop.ttl = 1;
    untouched(&mut h, "TTL 1", &tcp(last_hop, 41003, 30081, Tcp::Syn));
    // No endpoints: TC rejects.
    let empty = tcp(ip(CLIENT, NODE_PORT_ADDR), 41004, 30084, Tcp::Syn);
    untouched(&mut h, "no endpoints", &empty);
    assert_eq!(h.run(&empty).0, TC_ACT_REDIRECT, "TC sends the ICMP reject back");
    assert_eq!(h.event(FlowEvent::XdpPassedToStack) - passed_before, 4);

    // Not for XDP at all (no event): a fragment, ICMP, not a service.
    let mut fragment = ip(CLIENT, NODE_PORT_ADDR);
    fragment.more_fragments = true;
    untouched(&mut h, "first fragment", &tcp(fragment, 41005, 30081, Tcp::Syn));
    untouched(
        &mut h,
        "ICMP",
        &icmp_error(
            POD_A,
            CLIENT,
            etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
            &[0; 28],
            64,
        ),
    );
    untouched(&mut h, "not a frontend", &tcp(ip(CLIENT, POD_A), 41006, 80, Tcp::Syn));
    assert_eq!(h.event(FlowEvent::XdpPassedToStack) - passed_before, 4);

    // Drops are counted under the same reasons as at TC.
    let source_ranges = h.drops(DropReason::SourceRange);
    let (action, _) = h.run_xdp(dev, &tcp(ip(CLIENT, LB_IP), 41007, 80, Tcp::Syn));
    assert_eq!(action, XDP_DROP, "outside loadBalancerSourceRanges");
    assert_eq!(h.drops(DropReason::SourceRange), source_ranges + 1);
    let truncated = h.drops(DropReason::Truncated);
    let mut short = tcp(ip(CLIENT, NODE_PORT_ADDR), 41008, 30081, Tcp::Syn);
    short.truncate(14 + 20 + 10);
    let (action, _) = h.run_xdp(dev, &short);
    assert_eq!(action, XDP_DROP, "truncated TCP header");
    assert_eq!(h.drops(DropReason::Truncated), truncated + 1);
}

// ---- IPv6 ---------------------------------------------------------------------

const NODE_ADDR6: [u8; 16] = v6(0x18, 0xffff, 0xfe);
const CLIENT6: [u8; 16] = v6(0x18, 2, 0x10);
const VIP6: [u8; 16] = v6(0x19, 0, 0x10);
const BACKEND6: [u8; 16] = v6(0x18, 1, 0x11);

/// fd00:198:<net>:<subnet>::<host> (ULA; 0x18 nodes/pods/clients, 0x19 services).
const fn v6(net: u16, subnet: u16, host: u16) -> [u8; 16] {
    let (n, s, h) = (net.to_be_bytes(), subnet.to_be_bytes(), host.to_be_bytes());
    [
        0xfd, 0, 0x01, 0x98, n[0], n[1], s[0], s[1], 0, 0, 0, 0, 0, 0, h[0], h[1],
    ]
}

/// An IPv6 packet's headers: hop limit and extension headers.
struct Ip6 {
    src: [u8; 16],
    dst: [u8; 16],
    hop_limit: u8,
    exts: etherparse::Ipv6Extensions,
}

fn ip6(src: [u8; 16], dst: [u8; 16]) -> Ip6 {
    Ip6 {
        src,
        dst,
        hop_limit: 64,
        exts: Default::default(),
    }
}

impl Ip6 {
    fn forwarded(mut self) -> Self {
        self.hop_limit -= 1;
        self
    }

    /// With hop-by-hop and destination options headers (PadN only).
    fn with_options(mut self) -> Self {
        let pad = [1u8, 4, 0, 0, 0, 0];
        self.exts.hop_by_hop_options =
            Some(etherparse::Ipv6RawExtHeader::new_raw(etherparse::IpNumber::TCP, &pad).unwrap());
        self.exts.destination_options =
            Some(etherparse::Ipv6RawExtHeader::new_raw(etherparse::IpNumber::TCP, &pad).unwrap());
        self
    }

    fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.exts.fragment = Some(etherparse::Ipv6FragmentHeader::new(
            etherparse::IpNumber::TCP,
            IpFragOffset::try_new(offset).unwrap(),
            more,
            7,
        ));
        self
    }

    fn headers(self) -> IpHeaders {
        let mut h = etherparse::Ipv6Header {
            hop_limit: self.hop_limit,
            source: self.src,
            destination: self.dst,
            ..Default::default()
        };
        h.next_header = etherparse::IpNumber::TCP;
        IpHeaders::Ipv6(h, self.exts)
    }
}

fn tcp6(ip: Ip6, sport: u16, dport: u16, flags: Tcp) -> Vec<u8> {
    tcp_over(ip.headers(), sport, dport, flags)
}

fn udp6(ip: Ip6, sport: u16, dport: u16) -> Vec<u8> {
    udp_over(ip.headers(), sport, dport)
}

fn service_port6(vip: [u8; 16], port: u16, protocol: Protocol, backends: &[([u8; 16], u16)]) -> ServicePort {
    let frontend = Frontend::new(Ipv6Addr::from(vip).into(), port, protocol);
    ServicePort::new(
        format!("net-test/{frontend}"),
        frontend,
        backends
            .iter()
            .map(|&(ip, port)| Endpoint {
                ip: Ipv6Addr::from(ip).into(),
                port,
            })
            .collect(),
    )
}

fn model6() -> Model {
    use lb_common::svc_flags;
    let mut node_port = service_port6(NODE_ADDR6, 30080, Protocol::Tcp, &[(BACKEND6, 80)]);
    node_port.flags = svc_flags::SNAT_ALWAYS;
    let mut m = model(vec![
        service_port6(VIP6, 8080, Protocol::Tcp, &[(BACKEND6, 80)]),
        service_port6(VIP6, 53, Protocol::Udp, &[(BACKEND6, 5353)]),
        service_port6(v6(0x19, 0, 0x12), 80, Protocol::Tcp, &[]),
        node_port,
    ]);
    m.cluster_ips = [VIP6, v6(0x19, 0, 0x12)]
        .into_iter()
        .map(|a| Ipv6Addr::from(a).into())
        .collect();
    m
}

#[test]
fn ipv6_clusterip_tcp_and_udp_through_extension_headers() {
    let mut h = Harness::new(&model6());
    run_table(
        &mut h,
        vec![
            Case {
                name: "IPv6 client → ClusterIP: DNAT, L4 checksum over the new pseudo-header",
                input: tcp6(ip6(CLIENT6, VIP6), 40000, 8080, Tcp::Syn),
                expect: Expect::Rewritten(tcp6(ip6(CLIENT6, BACKEND6).forwarded(), 40000, 80, Tcp::Syn)),
            },
            Case {
                name: "IPv6 backend reply: the ClusterIP again",
                input: tcp6(ip6(BACKEND6, CLIENT6), 80, 40000, Tcp::SynAck),
                expect: Expect::Rewritten(tcp6(ip6(VIP6, CLIENT6).forwarded(), 8080, 40000, Tcp::SynAck)),
            },
            Case {
                name: "hop-by-hop and destination options skipped, kept in the packet",
                input: tcp6(ip6(CLIENT6, VIP6).with_options(), 40001, 8080, Tcp::Syn),
                expect: Expect::Rewritten(tcp6(
                    ip6(CLIENT6, BACKEND6).with_options().forwarded(),
                    40001,
                    80,
                    Tcp::Syn,
                )),
            },
            Case {
                name: "IPv6 UDP",
                input: udp6(ip6(CLIENT6, VIP6), 40002, 53),
                expect: Expect::Rewritten(udp6(ip6(CLIENT6, BACKEND6).forwarded(), 40002, 5353)),
            },
            Case {
                name: "first fragment to a service: dropped like IPv4's",
                input: tcp6(ip6(CLIENT6, VIP6).fragment(0, true), 40003, 8080, Tcp::Syn),
                expect: Expect::Dropped(DropReason::FragmentToService),
            },
            Case {
                name: "later fragment: not ours",
                input: tcp6(ip6(CLIENT6, VIP6).fragment(8, false), 40004, 8080, Tcp::Syn),
                expect: Expect::Untouched,
            },
            Case {
                name: "not a service address: untouched",
                input: tcp6(ip6(CLIENT6, BACKEND6), 40005, 80, Tcp::Syn),
                expect: Expect::Untouched,
            },
            Case {
                name: "IPv6 ClusterIP without endpoints: ICMPv6 port unreachable",
                input: tcp6(ip6(CLIENT6, v6(0x19, 0, 0x12)), 40006, 80, Tcp::Syn),
                expect: Expect::Rejected,
            },
            Case {
                name: "IPv6 ClusterIP on a port it does not serve, UDP: ICMPv6 port unreachable",
                input: udp6(ip6(CLIENT6, VIP6), 40008, 9999),
                expect: Expect::Rejected,
            },
        ],
    );
    // A truncated extension header is a counted drop, not a wrong parse.
    let mut short = tcp6(ip6(CLIENT6, VIP6).with_options(), 40007, 8080, Tcp::Syn);
    short.truncate(14 + 40 + 1);
    let before = h.drops(DropReason::Truncated);
    let (action, _) = h.run(&short);
    assert_eq!(action, TC_ACT_SHOT, "truncated extension header");
    assert_eq!(h.drops(DropReason::Truncated), before + 1);
}

#[test]
fn ipv6_nodeport_is_masqueraded_as_the_nodes_ipv6_address() {
    let mut h = Harness::new(&model6());
    let (action, out) = h.run(&tcp6(ip6(CLIENT6, NODE_ADDR6), 41000, 30080, Tcp::Syn));
    assert_eq!(action, TC_ACT_REDIRECT);
    let port = u16::from_be_bytes([out[54], out[55]]);
    assert!(lb_common::conntrack::snat_ports::contains(port), "SNAT port {port}");
    assert_eq!(
        hex(&out),
        hex(&tcp6(ip6(NODE_ADDR6, BACKEND6).forwarded(), port, 80, Tcp::Syn)),
        "source: the node's IPv6 address toward the backend"
    );
    let (action, out) = h.run(&tcp6(ip6(BACKEND6, NODE_ADDR6), 80, port, Tcp::SynAck));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        hex(&out),
        hex(&tcp6(ip6(NODE_ADDR6, CLIENT6).forwarded(), 30080, 41000, Tcp::SynAck)),
        "reply: from the NodePort to the client"
    );
}

#[test]
fn ipv6_through_xdp_with_masquerade_and_extension_headers() {
    let mut h = Harness::new(&model6());
    let dev = h.prepare_xdp();
    for (addr, mac) in [(CLIENT6, CLIENT_MAC), (BACKEND6, POD_A_MAC)] {
        let addr = Ipv6Addr::from(addr).to_string();
        h.netns
            .ip(&[
                "-6",
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac_arg(mac),
                "dev",
                "lbk0",
                "nud",
                "permanent",
            ])
            .unwrap();
    }
    let forwarded = h.event(FlowEvent::XdpForwarded);
    let (action, out) = h.run_xdp(dev, &tcp6(ip6(CLIENT6, NODE_ADDR6), 42000, 30080, Tcp::Syn));
    assert_eq!(action, XDP_REDIRECT, "IPv6 NodePort by XDP");
    let port = u16::from_be_bytes([out[54], out[55]]);
    assert!(lb_common::conntrack::snat_ports::contains(port), "SNAT port {port}");
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp6(ip6(NODE_ADDR6, BACKEND6).forwarded(), port, 80, Tcp::Syn),
            POD_A_MAC
        ))
    );
    let (action, out) = h.run_xdp(dev, &tcp6(ip6(BACKEND6, NODE_ADDR6), 80, port, Tcp::SynAck));
    assert_eq!(action, XDP_REDIRECT, "reply");
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp6(ip6(NODE_ADDR6, CLIENT6).forwarded(), 30080, 42000, Tcp::SynAck),
            CLIENT_MAC
        ))
    );
    let (action, out) = h.run_xdp(dev, &tcp6(ip6(CLIENT6, VIP6).with_options(), 42001, 8080, Tcp::Syn));
    assert_eq!(action, XDP_REDIRECT, "ClusterIP with extension headers");
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp6(ip6(CLIENT6, BACKEND6).with_options().forwarded(), 42001, 80, Tcp::Syn),
            POD_A_MAC
        ))
    );
    let (action, out) = h.run_xdp(dev, &udp6(ip6(CLIENT6, VIP6), 42002, 53));
    assert_eq!(action, XDP_REDIRECT, "UDP");
    assert_eq!(
        hex(&out),
        hex(&via(udp6(ip6(CLIENT6, BACKEND6).forwarded(), 42002, 5353), POD_A_MAC))
    );
    assert_eq!(h.event(FlowEvent::XdpForwarded) - forwarded, 4);
}

fn icmp6_error(
    src: [u8; 16],
    dst: [u8; 16],
    icmp_type: etherparse::Icmpv6Type,
    quoted: &[u8],
    hop_limit: u8,
) -> Vec<u8> {
    let h = etherparse::Ipv6Header {
        hop_limit,
        source: src,
        destination: dst,
        next_header: etherparse::IpNumber::IPV6_ICMP,
        ..Default::default()
    };
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(IpHeaders::Ipv6(h, Default::default()))
        .icmpv6(icmp_type);
    let mut out = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut out, quoted).unwrap();
    out
}

/// `quoted` (an IPv6 header + L4 bytes) with new addresses and ports.
fn requote6(quoted: &[u8], src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    let mut q = quoted.to_vec();
    q[8..24].copy_from_slice(&src);
    q[24..40].copy_from_slice(&dst);
    q[40..42].copy_from_slice(&sport.to_be_bytes());
    q[42..44].copy_from_slice(&dport.to_be_bytes());
    q
}

#[test]
fn icmpv6_errors_about_nated_flows_are_translated_back_and_ndp_is_untouched() {
    use etherparse::{Icmpv6Type, icmpv6::DestUnreachableCode};
    let mut h = Harness::new(&model6());

    // Not masqueraded: UDP to an IPv6 ClusterIP, the backend answers "port unreachable".
    let (_, to_backend) = h.run(&udp6(ip6(CLIENT6, VIP6), 50100, 53));
    let quoted = &to_backend[14..14 + 40 + 8];
    let unreachable = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port);
    let (action, out) = h.run(&icmp6_error(BACKEND6, CLIENT6, unreachable, quoted, 64));
    assert_eq!(action, TC_ACT_REDIRECT);
    let want = icmp6_error(
        VIP6,
        CLIENT6,
        unreachable,
        &requote6(quoted, CLIENT6, 50100, VIP6, 53),
        63,
    );
    assert_eq!(hex(&out), hex(&want), "from the ClusterIP, quoting the client's packet");

    // Masqueraded: an IPv6 NodePort flow; a router on the way says "packet too big".
    let (_, to_backend) = h.run(&tcp6(ip6(CLIENT6, NODE_ADDR6), 43000, 30080, Tcp::Ack));
    let quoted = &to_backend[14..14 + 40 + 20];
    let router = v6(0x18, 1, 1);
    let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
    let (action, out) = h.run(&icmp6_error(router, NODE_ADDR6, too_big, quoted, 64));
    assert_eq!(action, TC_ACT_REDIRECT);
    let want = icmp6_error(
        router,
        CLIENT6,
        too_big,
        &requote6(quoted, CLIENT6, 43000, NODE_ADDR6, 30080),
        63,
    );
    assert_eq!(
        hex(&out),
        hex(&want),
        "PMTU error reaches the client about its own packet"
    );

    // Not about a flow of ours, and NDP: untouched.
    let stray = icmp6_error(
        router,
        CLIENT6,
        unreachable,
        &requote6(quoted, CLIENT6, 1, router, 2),
        64,
    );
    let solicitation = icmp6_error(
        CLIENT6,
        NODE_ADDR6,
        Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        },
        &NODE_ADDR6,
        255,
    );
    for pkt in [stray, solicitation] {
        let (action, out) = h.run(&pkt);
        assert_eq!((action, hex(&out)), (TC_ACT_OK, hex(&pkt)));
    }
}

// ---- externalTrafficPolicy Local: in-cluster sources ---------------------------

/// A pod of the node's cluster CIDR (198.18.1.0/24, fd00:198:18:1::/64).
const POD_CLIENT: [u8; 4] = [198, 18, 1, 50];
const POD_CLIENT6: [u8; 16] = v6(0x18, 1, 0x50);

/// An eTP Local frontend as the model programs it on a node without a
/// local endpoint: the frontend's entry is empty (external sources are
/// dropped) and flagged to send in-cluster sources to its internal entry,
/// which holds the service's endpoints elsewhere.
fn etp_local_without_local_endpoint(external: ServicePort) -> Vec<ServicePort> {
    use lb_common::{ServiceScope, svc_flags};
    let mut internal = external.clone();
    internal.frontend.scope = ServiceScope::Internal;
    internal.flags = svc_flags::SNAT_OUTSIDE_CLUSTER | (external.flags & svc_flags::SOURCE_RANGES);
    let mut external = external;
    external.endpoints.clear();
    external.flags |= svc_flags::DROP_IF_EMPTY | svc_flags::IN_CLUSTER_USES_INTERNAL;
    vec![external, internal]
}

const LB_IP_LOCAL: [u8; 4] = [198, 19, 100, 2];

fn etp_local_model() -> Model {
    let mut ports =
        etp_local_without_local_endpoint(service_port(NODE_PORT_ADDR, 30085, Protocol::Tcp, &[(POD_A, 80)]));
    ports.extend(etp_local_without_local_endpoint(service_port6(
        NODE_ADDR6,
        30085,
        Protocol::Tcp,
        &[(BACKEND6, 80)],
    )));
    // A load-balancer IP with source ranges: one pod range, and the client.
    let mut lb = service_port(LB_IP_LOCAL, 80, Protocol::Tcp, &[(POD_A, 80)]);
    lb.flags = lb_common::svc_flags::SOURCE_RANGES;
    lb.source_ranges = vec!["198.18.1.48/28".parse().unwrap(), "198.18.2.0/24".parse().unwrap()];
    ports.extend(etp_local_without_local_endpoint(lb));
    model(ports)
}

fn etp_local_harness() -> Harness {
    let h = Harness::new(&etp_local_model());
    let mut h = h;
    h.datapath
        .maps
        .set_cidrs(&[
            ("198.18.1.0/24".parse().unwrap(), lb_common::cidr_kind::CLUSTER),
            ("fd00:198:18:1::/64".parse().unwrap(), lb_common::cidr_kind::CLUSTER),
        ])
        .unwrap();
    h
}

#[test]
fn etp_local_sends_pods_to_every_endpoint_and_drops_external_sources_without_a_local_one() {
    let mut h = etp_local_harness();
    run_table(
        &mut h,
        vec![
            Case {
                name: "pod → eTP Local NodePort, no local endpoint: remote endpoint, pod source kept",
                input: tcp(ip(POD_CLIENT, NODE_PORT_ADDR), 42000, 30085, Tcp::Syn),
                expect: Expect::Rewritten(tcp(ip(POD_CLIENT, POD_A).forwarded(), 42000, 80, Tcp::Syn)),
            },
            Case {
                name: "its reply: from the NodePort again",
                input: tcp(ip(POD_A, POD_CLIENT), 80, 42000, Tcp::SynAck),
                expect: Expect::Rewritten(tcp(
                    ip(NODE_PORT_ADDR, POD_CLIENT).forwarded(),
                    30085,
                    42000,
                    Tcp::SynAck,
                )),
            },
            Case {
                name: "the pod's next segment stays on the internal entry's flow",
                input: tcp(ip(POD_CLIENT, NODE_PORT_ADDR), 42000, 30085, Tcp::Ack),
                expect: Expect::Rewritten(tcp(ip(POD_CLIENT, POD_A).forwarded(), 42000, 80, Tcp::Ack)),
            },
            Case {
                name: "external client → the same NodePort: dropped (no local endpoint)",
                input: tcp(ip(CLIENT, NODE_PORT_ADDR), 42001, 30085, Tcp::Syn),
                expect: Expect::Dropped(DropReason::NoBackend),
            },
            Case {
                name: "IPv6 pod → eTP Local NodePort: remote endpoint, pod source kept",
                input: tcp6(ip6(POD_CLIENT6, NODE_ADDR6), 42002, 30085, Tcp::Syn),
                expect: Expect::Rewritten(tcp6(ip6(POD_CLIENT6, BACKEND6).forwarded(), 42002, 80, Tcp::Syn)),
            },
            Case {
                name: "IPv6 reply: from the NodePort again",
                input: tcp6(ip6(BACKEND6, POD_CLIENT6), 80, 42002, Tcp::SynAck),
                expect: Expect::Rewritten(tcp6(
                    ip6(NODE_ADDR6, POD_CLIENT6).forwarded(),
                    30085,
                    42002,
                    Tcp::SynAck,
                )),
            },
            Case {
                name: "IPv6 external client: dropped",
                input: tcp6(ip6(CLIENT6, NODE_ADDR6), 42003, 30085, Tcp::Syn),
                expect: Expect::Dropped(DropReason::NoBackend),
            },
            Case {
                name: "pod in the LB IP's source ranges: short-circuited to the remote endpoint",
                input: tcp(ip(POD_CLIENT, LB_IP_LOCAL), 42004, 80, Tcp::Syn),
                expect: Expect::Rewritten(tcp(ip(POD_CLIENT, POD_A).forwarded(), 42004, 80, Tcp::Syn)),
            },
            Case {
                name: "pod outside the source ranges: dropped (the firewall comes before the short-circuit)",
                input: tcp(ip([198, 18, 1, 100], LB_IP_LOCAL), 42005, 80, Tcp::Syn),
                expect: Expect::Dropped(DropReason::SourceRange),
            },
            Case {
                name: "external client in the source ranges, no local endpoint: dropped",
                input: tcp(ip(CLIENT, LB_IP_LOCAL), 42006, 80, Tcp::Syn),
                expect: Expect::Dropped(DropReason::NoBackend),
            },
            Case {
                name: "external client outside the source ranges: dropped by the firewall",
                input: tcp(ip([198, 18, 3, 10], LB_IP_LOCAL), 42007, 80, Tcp::Syn),
                expect: Expect::Dropped(DropReason::SourceRange),
            },
        ],
    );

    // The XDP path makes the same choice.
    let dev = h.prepare_xdp();
    let (action, out) = h.run_xdp(dev, &tcp(ip(POD_CLIENT, NODE_PORT_ADDR), 42010, 30085, Tcp::Syn));
    assert_eq!(action, XDP_REDIRECT, "XDP: pod source → internal entry");
    assert_eq!(
        hex(&out),
        hex(&via(
            tcp(ip(POD_CLIENT, POD_A).forwarded(), 42010, 80, Tcp::Syn),
            POD_A_MAC
        ))
    );
    let external = tcp(ip(CLIENT, NODE_PORT_ADDR), 42011, 30085, Tcp::Syn);
    let (action, out) = h.run_xdp(dev, &external);
    assert_eq!(
        action, XDP_PASS,
        "XDP: external source without a local endpoint goes to TC"
    );
    assert_eq!(hex(&out), hex(&external));
    drop(h);

    // Without --cluster-cidr nothing tells pods apart (kube-proxy's
    // detectLocal is off): a pod is an external source like any other.
    let mut h = Harness::new(&etp_local_model());
    check(
        &mut h,
        Case {
            name: "no cluster CIDR: no short-circuit for pods",
            input: tcp(ip(POD_CLIENT, NODE_PORT_ADDR), 42020, 30085, Tcp::Syn),
            expect: Expect::Dropped(DropReason::NoBackend),
        },
    );
}

// ---- SCTP -----------------------------------------------------------------------

/// The reference CRC32c (SCTP's checksum) the expected packets carry.
const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
const SCTP_VIP: [u8; 4] = [198, 19, 0, 40];
const SCTP_EMPTY_VIP: [u8; 4] = [198, 19, 0, 41];
/// Diameter's port on the service, another on the pods: DNAT changes the
/// port, so the CRC32c must follow.
const SCTP_PORT: u16 = 3868;
const SCTP_TARGET: u16 = 3869;
/// M3UA's port, the same on both ends: DNAT leaves the CRC32c as it is.
const SCTP_SAME_PORT: u16 = 2905;
const SCTP_NODE_PORT: u16 = 30868;

/// The first (here: only) chunk of a crafted SCTP packet.
#[derive(Clone, Copy)]
enum Chunk {
    Init,
    InitAck,
    Data,
    /// DATA with 1400 bytes of user data.
    BigData,
    Abort,
}

/// An SCTP packet (common header + one chunk) with its CRC32c computed
/// by the reference implementation.
fn sctp_packet(sport: u16, dport: u16, chunk: Chunk) -> Vec<u8> {
    // INIT travels with verification tag 0; the rest with the peer's tag.
    let vtag: u32 = if matches!(chunk, Chunk::Init) { 0 } else { 0x5ca1_ab1e };
    let init = |tag: u32| -> Vec<u8> {
        // Initiate tag, a_rwnd, outbound / inbound streams, initial TSN.
        [
            &tag.to_be_bytes()[..],
            &65536u32.to_be_bytes(),
            &[0, 10, 0, 10],
            &1u32.to_be_bytes(),
        ]
        .concat()
    };
    let data = |user: &[u8]| -> Vec<u8> {
        // TSN, stream id, stream sequence, payload protocol id, user data.
        [&1u32.to_be_bytes()[..], &[0, 0, 0, 0], &46u32.to_be_bytes(), user].concat()
    };
    let (kind, flags, body) = match chunk {
        Chunk::Init => (1u8, 0u8, init(0x1122_3344)),
        Chunk::InitAck => (2, 0, init(0x5ca1_ab1e)),
        Chunk::Data => (0, 3, data(b"hello")),
        Chunk::BigData => (0, 3, data(&[0xa5; 1400])),
        Chunk::Abort => (6, 0, vec![]),
    };
    let mut p = Vec::new();
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend(vtag.to_be_bytes());
    p.extend([0u8; 4]);
    p.extend([kind, flags]);
    p.extend((4 + body.len() as u16).to_be_bytes());
    p.extend(&body);
    p.resize(p.len().next_multiple_of(4), 0);
    let crc = CASTAGNOLI.checksum(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

fn sctp_over(ip: IpHeaders, sport: u16, dport: u16, chunk: Chunk) -> Vec<u8> {
    let payload = sctp_packet(sport, dport, chunk);
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ip(ip);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, etherparse::IpNumber::SCTP, &payload).unwrap();
    out
}

fn sctp(ip: Ip, sport: u16, dport: u16, chunk: Chunk) -> Vec<u8> {
    sctp_over(ip_header(&ip), sport, dport, chunk)
}

fn sctp6(ip: Ip6, sport: u16, dport: u16, chunk: Chunk) -> Vec<u8> {
    sctp_over(ip.headers(), sport, dport, chunk)
}

/// Where the SCTP header of a crafted frame starts (no IP options or
/// extension headers) and where the packet the CRC32c covers ends.
fn sctp_span(pkt: &[u8]) -> std::ops::Range<usize> {
    if pkt[12..14] == [0x86, 0xdd] {
        54..54 + u16::from_be_bytes([pkt[18], pkt[19]]) as usize
    } else {
        34..14 + u16::from_be_bytes([pkt[16], pkt[17]]) as usize
    }
}

/// The frame with its CRC32c field set to 0, as the SCTP stack leaves it
/// for checksum offload.
fn offloaded_crc(mut pkt: Vec<u8>) -> Vec<u8> {
    let at = sctp_span(&pkt).start + 8;
    pkt[at..at + 4].fill(0);
    pkt
}

/// Does the SCTP packet in `pkt` carry its correct CRC32c?
fn sctp_crc_valid(pkt: &[u8]) -> bool {
    let span = sctp_span(pkt);
    let Some(l4) = pkt.get(span) else { return false };
    if l4.len() < 12 {
        return false;
    }
    let mut zeroed = l4.to_vec();
    zeroed[8..12].fill(0);
    CASTAGNOLI.checksum(&zeroed).to_le_bytes() == l4[8..12]
}

fn sctp_model() -> Model {
    use lb_common::svc_flags;
    let mut node_port = service_port(NODE_PORT_ADDR, SCTP_NODE_PORT, Protocol::Sctp, &[(POD_A, SCTP_TARGET)]);
    node_port.flags = svc_flags::SNAT_ALWAYS;
    let mut node_port6 = service_port6(NODE_ADDR6, SCTP_NODE_PORT, Protocol::Sctp, &[(BACKEND6, SCTP_TARGET)]);
    node_port6.flags = svc_flags::SNAT_ALWAYS;
    let mut m = model(vec![
        service_port(SCTP_VIP, SCTP_PORT, Protocol::Sctp, &[(BACKEND, SCTP_TARGET)]),
        service_port(SCTP_VIP, SCTP_SAME_PORT, Protocol::Sctp, &[(BACKEND, SCTP_SAME_PORT)]),
        service_port(SCTP_VIP, 8080, Protocol::Tcp, &[(BACKEND, 80)]),
        service_port(SCTP_EMPTY_VIP, SCTP_PORT, Protocol::Sctp, &[]),
        node_port,
        service_port6(VIP6, SCTP_PORT, Protocol::Sctp, &[(BACKEND6, SCTP_TARGET)]),
        node_port6,
    ]);
    m.cluster_ips = [v4(SCTP_VIP), v4(SCTP_EMPTY_VIP), Ipv6Addr::from(VIP6).into()]
        .into_iter()
        .collect();
    m
}

#[test]
fn sctp_clusterip_dnat_and_reverse_nat_keep_the_crc32c_bit_exact() {
    let mut h = Harness::new(&sctp_model());
    // The SCTP header cut after 8 bytes (IP length and frame agree).
    let mut cut = sctp(ip(CLIENT, SCTP_VIP), 36010, SCTP_PORT, Chunk::Init)[..14 + 20 + 8].to_vec();
    cut[16..18].copy_from_slice(&28u16.to_be_bytes());
    // The frame holds the whole packet, the IP length only 8 bytes of it.
    let mut short_ip_len = sctp(ip(CLIENT, SCTP_VIP), 36011, SCTP_PORT, Chunk::Init);
    short_ip_len[16..18].copy_from_slice(&28u16.to_be_bytes());
    run_table(
        &mut h,
        vec![
            Case {
                name: "INIT to the ClusterIP: DNAT to the target port, CRC32c updated",
                input: sctp(ip(CLIENT, SCTP_VIP), 36000, SCTP_PORT, Chunk::Init),
                expect: Expect::Rewritten(sctp(ip(CLIENT, BACKEND).forwarded(), 36000, SCTP_TARGET, Chunk::Init)),
            },
            Case {
                name: "INIT ACK from the backend: from the ClusterIP's port again, CRC32c updated",
                input: sctp(ip(BACKEND, CLIENT), SCTP_TARGET, 36000, Chunk::InitAck),
                expect: Expect::Rewritten(sctp(ip(SCTP_VIP, CLIENT).forwarded(), SCTP_PORT, 36000, Chunk::InitAck)),
            },
            Case {
                name: "DATA follows the association's conntrack entry",
                input: sctp(ip(CLIENT, SCTP_VIP), 36000, SCTP_PORT, Chunk::Data),
                expect: Expect::Rewritten(sctp(ip(CLIENT, BACKEND).forwarded(), 36000, SCTP_TARGET, Chunk::Data)),
            },
            Case {
                name: "1400 bytes of DATA: the same update, whatever the length",
                input: sctp(ip(CLIENT, SCTP_VIP), 36000, SCTP_PORT, Chunk::BigData),
                expect: Expect::Rewritten(sctp(
                    ip(CLIENT, BACKEND).forwarded(),
                    36000,
                    SCTP_TARGET,
                    Chunk::BigData,
                )),
            },
            Case {
                name: "same port on both ends: addresses only, the CRC32c unchanged",
                input: sctp(ip(CLIENT, SCTP_VIP), 36001, SCTP_SAME_PORT, Chunk::Init),
                expect: Expect::Rewritten(sctp(
                    ip(CLIENT, BACKEND).forwarded(),
                    36001,
                    SCTP_SAME_PORT,
                    Chunk::Init,
                )),
            },
            Case {
                name: "CRC32c 0 (left to offload): stays 0 through the port change",
                input: offloaded_crc(sctp(ip(CLIENT, SCTP_VIP), 36002, SCTP_PORT, Chunk::Init)),
                expect: Expect::Rewritten(offloaded_crc(sctp(
                    ip(CLIENT, BACKEND).forwarded(),
                    36002,
                    SCTP_TARGET,
                    Chunk::Init,
                ))),
            },
            Case {
                name: "SCTP to the ClusterIP's TCP port: REJECT (ICMP quoting the common header)",
                input: sctp(ip(CLIENT, SCTP_VIP), 36003, 8080, Chunk::Init),
                expect: Expect::Rejected,
            },
            Case {
                name: "SCTP service without endpoints: REJECT",
                input: sctp(ip(CLIENT, SCTP_EMPTY_VIP), 36004, SCTP_PORT, Chunk::Init),
                expect: Expect::Rejected,
            },
            Case {
                name: "SCTP common header cut short: counted drop",
                input: cut,
                expect: Expect::Dropped(DropReason::Truncated),
            },
            Case {
                name: "IP length shorter than the SCTP common header: counted drop",
                input: short_ip_len,
                expect: Expect::Dropped(DropReason::Truncated),
            },
        ],
    );
}

#[test]
fn sctp_nodeport_is_masqueraded_with_the_crc32c_following_both_ports_on_tc_and_xdp() {
    let mut h = Harness::new(&sctp_model());
    // TC.
    let (action, out) = h.run(&sctp(ip(CLIENT, NODE_PORT_ADDR), 37000, SCTP_NODE_PORT, Chunk::Init));
    assert_eq!(action, TC_ACT_REDIRECT);
    let port = sport_of(&out);
    assert!(lb_common::conntrack::snat_ports::contains(port), "SNAT port {port}");
    assert_eq!(
        hex(&out),
        hex(&sctp(ip(NODE_ADDR, POD_A).forwarded(), port, SCTP_TARGET, Chunk::Init)),
        "masqueraded as the node, to the target port"
    );
    let (action, out) = h.run(&sctp(ip(POD_A, NODE_ADDR), SCTP_TARGET, port, Chunk::InitAck));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        hex(&out),
        hex(&sctp(
            ip(NODE_PORT_ADDR, CLIENT).forwarded(),
            SCTP_NODE_PORT,
            37000,
            Chunk::InitAck
        )),
        "reply: from the NodePort to the client"
    );

    // XDP: both ports in one update.
    let dev = h.prepare_xdp();
    let forwarded = h.event(FlowEvent::XdpForwarded);
    let (action, out) = h.run_xdp(
        dev,
        &sctp(ip(CLIENT, NODE_PORT_ADDR), 37001, SCTP_NODE_PORT, Chunk::Init),
    );
    assert_eq!(action, XDP_REDIRECT, "SCTP NodePort by XDP");
    let port = sport_of(&out);
    assert_eq!(
        hex(&out),
        hex(&via(
            sctp(ip(NODE_ADDR, POD_A).forwarded(), port, SCTP_TARGET, Chunk::Init),
            POD_A_MAC
        ))
    );
    let (action, out) = h.run_xdp(dev, &sctp(ip(POD_A, NODE_ADDR), SCTP_TARGET, port, Chunk::BigData));
    assert_eq!(action, XDP_REDIRECT, "reply by XDP");
    assert_eq!(
        hex(&out),
        hex(&via(
            sctp(
                ip(NODE_PORT_ADDR, CLIENT).forwarded(),
                SCTP_NODE_PORT,
                37001,
                Chunk::BigData
            ),
            CLIENT_MAC
        ))
    );
    assert_eq!(h.event(FlowEvent::XdpForwarded) - forwarded, 2);
    // Truncated at XDP: counted like TC's.
    let truncated = h.drops(DropReason::Truncated);
    let mut cut = sctp(ip(CLIENT, NODE_PORT_ADDR), 37002, SCTP_NODE_PORT, Chunk::Init)[..14 + 20 + 8].to_vec();
    cut[16..18].copy_from_slice(&28u16.to_be_bytes());
    assert_eq!(h.run_xdp(dev, &cut).0, XDP_DROP);
    assert_eq!(h.drops(DropReason::Truncated), truncated + 1);
}

#[test]
fn sctp_over_ipv6_clusterip_nodeport_and_reject() {
    let mut h = Harness::new(&sctp_model());
    run_table(
        &mut h,
        vec![
            Case {
                name: "IPv6 INIT to the ClusterIP: DNAT to the target port, CRC32c updated",
                input: sctp6(ip6(CLIENT6, VIP6), 37100, SCTP_PORT, Chunk::Init),
                expect: Expect::Rewritten(sctp6(
                    ip6(CLIENT6, BACKEND6).forwarded(),
                    37100,
                    SCTP_TARGET,
                    Chunk::Init,
                )),
            },
            Case {
                name: "IPv6 INIT ACK: from the ClusterIP again",
                input: sctp6(ip6(BACKEND6, CLIENT6), SCTP_TARGET, 37100, Chunk::InitAck),
                expect: Expect::Rewritten(sctp6(ip6(VIP6, CLIENT6).forwarded(), SCTP_PORT, 37100, Chunk::InitAck)),
            },
            Case {
                name: "IPv6 with extension headers: the CRC32c length excludes them",
                input: sctp6(ip6(CLIENT6, VIP6).with_options(), 37101, SCTP_PORT, Chunk::Data),
                expect: Expect::Rewritten(sctp6(
                    ip6(CLIENT6, BACKEND6).with_options().forwarded(),
                    37101,
                    SCTP_TARGET,
                    Chunk::Data,
                )),
            },
            Case {
                name: "IPv6 ClusterIP on a port without SCTP service: ICMPv6 port unreachable",
                input: sctp6(ip6(CLIENT6, VIP6), 37102, 9999, Chunk::Init),
                expect: Expect::Rejected,
            },
        ],
    );
    let (action, out) = h.run(&sctp6(ip6(CLIENT6, NODE_ADDR6), 37103, SCTP_NODE_PORT, Chunk::Init));
    assert_eq!(action, TC_ACT_REDIRECT);
    let port = u16::from_be_bytes([out[54], out[55]]);
    assert_eq!(
        hex(&out),
        hex(&sctp6(
            ip6(NODE_ADDR6, BACKEND6).forwarded(),
            port,
            SCTP_TARGET,
            Chunk::Init
        )),
        "IPv6 NodePort masqueraded as the node's IPv6 address"
    );
    let (action, out) = h.run(&sctp6(ip6(BACKEND6, NODE_ADDR6), SCTP_TARGET, port, Chunk::InitAck));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        hex(&out),
        hex(&sctp6(
            ip6(NODE_ADDR6, CLIENT6).forwarded(),
            SCTP_NODE_PORT,
            37103,
            Chunk::InitAck
        ))
    );
}

#[test]
fn sctp_conntrack_lifetimes_follow_the_association_state() {
    let mut h = Harness::new(&sctp_model());
    let now = lb_agent::run::monotonic_secs();
    let send = |h: &mut Harness, sport: u16, chunk: Chunk| {
        let (action, _) = h.run(&sctp(ip(CLIENT, SCTP_VIP), sport, SCTP_PORT, chunk));
        assert_eq!(action, TC_ACT_REDIRECT);
    };
    send(&mut h, 38000, Chunk::Init);
    send(&mut h, 38001, Chunk::Init);
    send(&mut h, 38001, Chunk::Data);
    send(&mut h, 38002, Chunk::Init);
    send(&mut h, 38002, Chunk::Data);
    send(&mut h, 38002, Chunk::Abort);
    let lifetimes: Vec<(u16, u32)> = lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.kind == lb_common::CtKind::Forward as u8 && k.proto == lb_common::proto::SCTP)
        .map(|(k, e)| (k.src_port, e.expires_at - now))
        .collect();
    let ttl = |sport: u16| lifetimes.iter().find(|l| l.0 == sport).unwrap().1;
    use lb_common::conntrack::ct_timeouts;
    let within = |got: u32, want: u32| (want..=want + 1).contains(&got);
    assert!(within(ttl(38000), ct_timeouts::SCTP_HANDSHAKE), "INIT: {lifetimes:?}");
    assert!(within(ttl(38001), ct_timeouts::SCTP_ESTABLISHED), "DATA: {lifetimes:?}");
    assert!(within(ttl(38002), ct_timeouts::SCTP_CLOSING), "ABORT: {lifetimes:?}");
}

/// A long BPF_PROG_TEST_RUN, run again when a signal interrupted it.
fn retry_interrupted<T>(mut run: impl FnMut() -> Result<T, aya::programs::ProgramError>) -> T {
    for _ in 0..5 {
        match run() {
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::Interrupted => {}
            result => return result.expect("BPF_PROG_TEST_RUN"),
        }
    }
    panic!("BPF_PROG_TEST_RUN interrupted five times in a row");
}

/// The bench object (`lb-ebpf/src/bench.rs`): the CRC32c recomputation the
/// incremental update is measured against.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

/// The CRC32c update's cost, as BPF_PROG_TEST_RUN measures it: two
/// services whose backends are each other's frontend, so every repeated
/// run translates the packet the previous run left (after 63 runs its TTL
/// is spent and the packet is left to the stack instead of redirected, the
/// same for every protocol). Prints ns per packet; the CRC32c must still be
/// right after all those updates. Then the alternative, a recomputation
/// over the whole packet, timed alone (no lookup, no NAT) for comparison.
#[test]
fn sctp_crc32c_update_cost_per_packet() {
    let (a, b) = ([198, 19, 0, 50], [198, 19, 0, 51]);
    let pair = |protocol, port_a, port_b| {
        [
            service_port(a, port_a, protocol, &[(b, port_b)]),
            service_port(b, port_b, protocol, &[(a, port_a)]),
        ]
    };
    let m = model(
        [
            pair(Protocol::Udp, 5000, 6000),
            pair(Protocol::Sctp, 5000, 6000),
            pair(Protocol::Sctp, 7000, 7000),
        ]
        .concat(),
    );
    let mut h = Harness::new(&m);
    const RUNS: u32 = 200_000;
    let mut measure = |name: &str, pkt: Vec<u8>| -> Vec<u8> {
        let mut out = vec![0u8; pkt.len() + 256];
        let prog = h.datapath.ingress_program().unwrap();
        let r = retry_interrupted(|| {
            prog.test_run(TestRunOptions {
                data_in: Some(&pkt),
                data_out: Some(&mut out),
                repeat: RUNS,
                ..Default::default()
            })
        });
        out.truncate(r.data_size_out as usize);
        eprintln!("{name}: {} ns/packet", r.duration.as_nanos());
        out
    };
    measure(
        "UDP, port changed (Internet checksum helpers)",
        udp(ip(CLIENT, a), 40000, 5000),
    );
    let same = measure(
        "SCTP, same port (no CRC32c work)",
        sctp(ip(CLIENT, a), 40000, 7000, Chunk::Init),
    );
    let small = measure("SCTP INIT, port changed", sctp(ip(CLIENT, a), 40001, 5000, Chunk::Init));
    let big = measure(
        "SCTP 1400-byte DATA, port changed",
        sctp(ip(CLIENT, a), 40002, 5000, Chunk::BigData),
    );
    for (name, out) in [("same port", same), ("INIT", small), ("DATA", big)] {
        assert!(sctp_crc_valid(&out), "{name}: CRC32c wrong after {RUNS} translations");
        // An even number of translations: back at the first frontend.
        assert_eq!(&out[30..34], &a, "{name}");
    }

    let mut bench = aya::Ebpf::load(BENCH_OBJECT).expect("loading the bench object");
    let recompute: &mut aya::programs::Xdp = bench
        .program_mut("bench_sctp_crc_recompute")
        .unwrap()
        .try_into()
        .unwrap();
    recompute.load().expect("verifying bench_sctp_crc_recompute");
    for (name, chunk) in [("INIT", Chunk::Init), ("1400-byte DATA", Chunk::BigData)] {
        let pkt = offloaded_crc(sctp(ip(CLIENT, a), 40003, 5000, chunk));
        let mut out = vec![0u8; pkt.len() + 256];
        let r = retry_interrupted(|| {
            recompute.test_run(TestRunOptions {
                data_in: Some(&pkt),
                data_out: Some(&mut out),
                repeat: RUNS / 10,
                ..Default::default()
            })
        });
        out.truncate(r.data_size_out as usize);
        assert_eq!(r.return_value, XDP_PASS, "{name}: recomputed");
        assert!(sctp_crc_valid(&out), "{name}: the recomputed CRC32c is wrong");
        eprintln!(
            "{name}: recomputing the CRC32c alone: {} ns/packet",
            r.duration.as_nanos()
        );
    }
}

#[test]
fn icmp_errors_about_sctp_flows_are_translated_back() {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let mut h = Harness::new(&sctp_model());
    // A masqueraded SCTP NodePort flow; a router on the way needs fragmentation.
    let (_, to_backend) = h.run(&sctp(ip(CLIENT, NODE_PORT_ADDR), 39000, SCTP_NODE_PORT, Chunk::Data));
    let quoted = &to_backend[14..14 + 28];
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let router = [198, 18, 1, 1];
    let (action, out) = h.run(&icmp_error(router, NODE_ADDR, frag_needed.clone(), quoted, 64));
    assert_eq!(action, TC_ACT_REDIRECT);
    let want = icmp_error(
        router,
        CLIENT,
        frag_needed,
        &requote(quoted, CLIENT, 39000, NODE_PORT_ADDR, SCTP_NODE_PORT),
        63,
    );
    assert_eq!(
        hex(&out),
        hex(&want),
        "PMTU error about an SCTP flow reaches its client, quoting its packet"
    );
}

// ---- Host-network endpoints, TC egress, stack forwarding ------------------------

impl Harness {
    /// Runs `lb_egress` on `pkt` (a packet leaving the node).
    fn run_egress(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; pkt.len() + 256];
        let r = self
            .datapath
            .egress_program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN (egress)");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

/// `kubernetes.default` on a control-plane node and a NodePort to a
/// hostNetwork pod: the endpoints are the node's own address (NODE_ADDR,
/// NODE_ADDR6 are local in the test namespace).
fn host_endpoint_model() -> Model {
    use lb_common::svc_flags;
    let mut api = service_port(VIP, 443, Protocol::Tcp, &[(NODE_ADDR, 6443)]);
    // A client outside the cluster CIDRs would be masqueraded (to a remote backend).
    api.flags = svc_flags::SNAT_OUTSIDE_CLUSTER;
    let dns = service_port(UDP_VIP, 53, Protocol::Udp, &[(NODE_ADDR, 5353)]);
    let mut node_port = service_port(NODE_PORT_ADDR, 30443, Protocol::Tcp, &[(NODE_ADDR, 6443)]);
    node_port.flags = svc_flags::SNAT_ALWAYS;
    let api6 = service_port6(VIP6, 443, Protocol::Tcp, &[(NODE_ADDR6, 6443)]);
    model(vec![api, dns, node_port, api6])
}

/// A request in, the local endpoint's reply out: what each hook must make of them.
struct HostFlow {
    name: &'static str,
    /// Client → frontend, at TC ingress.
    request: Vec<u8>,
    /// Delivered locally as: DNATed, not masqueraded, TTL untouched.
    delivered: Vec<u8>,
    /// The endpoint's reply, at TC egress.
    reply: Vec<u8>,
    /// What leaves: from the frontend, checksums bit-exact.
    leaves: Vec<u8>,
}

#[test]
fn host_network_endpoint_is_delivered_locally_and_its_replies_leave_as_the_frontend() {
    let mut h = Harness::new(&host_endpoint_model());
    let flows = [
        HostFlow {
            name: "TCP to kubernetes.default (masquerade wanted: skipped for a local endpoint)",
            request: tcp(ip(CLIENT, VIP), 40000, 443, Tcp::Syn),
            delivered: tcp(ip(CLIENT, NODE_ADDR), 40000, 6443, Tcp::Syn),
            reply: tcp(ip(NODE_ADDR, CLIENT), 6443, 40000, Tcp::SynAck),
            leaves: tcp(ip(VIP, CLIENT), 443, 40000, Tcp::SynAck),
        },
        HostFlow {
            name: "UDP to a ClusterIP served by the node",
            request: udp(ip(CLIENT, UDP_VIP), 50000, 53),
            delivered: udp(ip(CLIENT, NODE_ADDR), 50000, 5353),
            reply: udp(ip(NODE_ADDR, CLIENT), 5353, 50000),
            leaves: udp(ip(UDP_VIP, CLIENT), 53, 50000),
        },
        HostFlow {
            name: "UDP without checksum keeps checksum 0 on the way out",
            request: without_udp_checksum(udp(ip(CLIENT, UDP_VIP), 50001, 53)),
            delivered: without_udp_checksum(udp(ip(CLIENT, NODE_ADDR), 50001, 5353)),
            reply: without_udp_checksum(udp(ip(NODE_ADDR, CLIENT), 5353, 50001)),
            leaves: without_udp_checksum(udp(ip(UDP_VIP, CLIENT), 53, 50001)),
        },
        HostFlow {
            name: "NodePort (eTP Cluster) to a hostNetwork endpoint: not masqueraded",
            request: tcp(ip(CLIENT, NODE_PORT_ADDR), 40001, 30443, Tcp::Syn),
            delivered: tcp(ip(CLIENT, NODE_ADDR), 40001, 6443, Tcp::Syn),
            reply: tcp(ip(NODE_ADDR, CLIENT), 6443, 40001, Tcp::SynAck),
            leaves: tcp(ip(NODE_PORT_ADDR, CLIENT), 30443, 40001, Tcp::SynAck),
        },
        HostFlow {
            name: "IPv6 TCP to a ClusterIP served by the node",
            request: tcp6(ip6(CLIENT6, VIP6), 40002, 443, Tcp::Syn),
            delivered: tcp6(ip6(CLIENT6, NODE_ADDR6), 40002, 6443, Tcp::Syn),
            reply: tcp6(ip6(NODE_ADDR6, CLIENT6), 6443, 40002, Tcp::SynAck),
            leaves: tcp6(ip6(VIP6, CLIENT6), 443, 40002, Tcp::SynAck),
        },
    ];
    for f in flows {
        let (local, revnat) = (h.event(FlowEvent::LocalEndpoint), h.event(FlowEvent::EgressReverseNat));
        let (action, out) = h.run(&f.request);
        assert_eq!(action, TC_ACT_OK, "{}: handed to the local stack", f.name);
        assert_eq!(hex(&out), hex(&f.delivered), "{}: delivered", f.name);
        assert_eq!(h.event(FlowEvent::LocalEndpoint), local + 1, "{}: counted", f.name);
        let (action, out) = h.run_egress(&f.reply);
        assert_eq!(action, TC_ACT_OK, "{}: reply", f.name);
        assert_eq!(hex(&out), hex(&f.leaves), "{}: reply leaves as", f.name);
        assert_eq!(h.event(FlowEvent::EgressReverseNat), revnat + 1, "{}: counted", f.name);
    }
    // The node answers a UDP flow with "port unreachable" (no server on the
    // endpoint port): the client must see it about its own packet, from the frontend.
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let unreachable = || Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let (_, delivered) = h.run(&udp(ip(CLIENT, UDP_VIP), 50002, 53));
    let quoted = &delivered[14..14 + 28];
    let error = icmp_error(NODE_ADDR, CLIENT, unreachable(), quoted, 64);
    let (action, out) = h.run_egress(&error);
    assert_eq!(action, TC_ACT_OK, "ICMP error at egress");
    let want = icmp_error(
        UDP_VIP,
        CLIENT,
        unreachable(),
        &requote(quoted, CLIENT, 50002, UDP_VIP, 53),
        64,
    );
    assert_eq!(hex(&out), hex(&want), "the node's port unreachable shows the frontend");
    // Not ours: untouched, whatever they look like.
    let stray = icmp_error(
        NODE_ADDR,
        CLIENT,
        unreachable(),
        &requote(quoted, CLIENT, 1, NODE_ADDR, 2),
        64,
    );
    for (name, pkt) in [
        ("an ICMP error about no flow of ours", stray),
        (
            "the node's own traffic",
            tcp(ip(NODE_ADDR, CLIENT), 6443, 40999, Tcp::Ack),
        ),
        ("a forwarded packet", tcp(ip(CLIENT, BACKEND), 40000, 80, Tcp::Ack)),
        (
            "an already translated reply",
            tcp(ip(VIP, CLIENT), 443, 40000, Tcp::Ack),
        ),
        ("UDP of the node", udp(ip(NODE_ADDR, CLIENT), 5353, 50999)),
        (
            "IPv6 of the node",
            tcp6(ip6(NODE_ADDR6, CLIENT6), 6443, 40999, Tcp::Ack),
        ),
    ] {
        let (action, out) = h.run_egress(&pkt);
        assert_eq!(action, TC_ACT_OK, "{name}");
        assert_eq!(hex(&out), hex(&pkt), "{name}: untouched");
    }
}

/// What TC egress costs a packet that is not ours (the common case on
/// every interface): printed, and bounded loosely so a regression to
/// something expensive shows.
#[test]
fn egress_costs_little_for_packets_that_are_not_ours() {
    let mut h = Harness::new(&host_endpoint_model());
    let tcp_not_ours = tcp(ip(NODE_ADDR, CLIENT), 22, 40999, Tcp::Ack);
    // Not IP at all: what BPF_PROG_TEST_RUN itself costs, for comparison.
    let mut arp = tcp_not_ours.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let average = |h: &mut Harness, pkt: &[u8]| {
        let mut out = vec![0u8; pkt.len() + 256];
        let r = h
            .datapath
            .egress_program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                repeat: 100_000,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN (egress)");
        assert_eq!(r.return_value, TC_ACT_OK);
        r.duration.as_nanos() as f64
    };
    let floor = average(&mut h, &arp);
    for stack in [false, true] {
        h.datapath.maps.set_stack_forwarding(stack).unwrap();
        let ns = average(&mut h, &tcp_not_ours);
        println!(
            "lb_egress, TCP packet not ours, stack forwarding {stack}: {ns:.0} ns/packet (non-IP: {floor:.0} ns; test_run averages)"
        );
        assert!(ns < 2_000.0, "egress takes {ns} ns for a packet not ours");
    }
}

#[test]
fn stack_forwarding_mode_dnats_at_ingress_and_masquerades_and_reverse_nats_at_egress() {
    use lb_common::svc_flags;
    let mut masqueraded = service_port(SELF_VIP, 8080, Protocol::Tcp, &[(POD_A, 80)]);
    masqueraded.flags = svc_flags::SNAT_ALWAYS;
    let mut h = Harness::new(&model(vec![
        service_port(VIP, 8080, Protocol::Tcp, &[(BACKEND, 80)]),
        masqueraded,
    ]));
    h.datapath.maps.set_stack_forwarding(true).unwrap();

    // Not masqueraded: DNAT at ingress, handed to the stack (which routes
    // and decrements the TTL); the reply crosses the stack as the backend
    // sent it and gets the frontend as its source at egress.
    let steps = [
        (
            "SYN at ingress: DNAT only",
            tcp(ip(CLIENT, VIP), 40000, 8080, Tcp::Syn),
            false,
            tcp(ip(CLIENT, BACKEND), 40000, 80, Tcp::Syn),
        ),
        (
            "SYN at egress: nothing more",
            tcp(ip(CLIENT, BACKEND), 40000, 80, Tcp::Syn),
            true,
            tcp(ip(CLIENT, BACKEND), 40000, 80, Tcp::Syn),
        ),
        (
            "reply at ingress: untouched for the stack",
            tcp(ip(BACKEND, CLIENT), 80, 40000, Tcp::SynAck),
            false,
            tcp(ip(BACKEND, CLIENT), 80, 40000, Tcp::SynAck),
        ),
        (
            "reply at egress: from the frontend",
            tcp(ip(BACKEND, CLIENT), 80, 40000, Tcp::SynAck),
            true,
            tcp(ip(VIP, CLIENT), 8080, 40000, Tcp::SynAck),
        ),
    ];
    for (name, input, egress, want) in steps {
        let (action, out) = if egress { h.run_egress(&input) } else { h.run(&input) };
        assert_eq!(action, TC_ACT_OK, "{name}: to the stack");
        assert_eq!(hex(&out), hex(&want), "{name}");
    }

    // Masqueraded: the node address becomes the source only at egress
    // (arriving with it, the packet would be a martian).
    let (action, out) = h.run(&tcp(ip(CLIENT, SELF_VIP), 40001, 8080, Tcp::Syn));
    assert_eq!(action, TC_ACT_OK, "masqueraded SYN to the stack");
    let dnated = tcp(ip(CLIENT, POD_A), 40001, 80, Tcp::Syn);
    assert_eq!(hex(&out), hex(&dnated), "masqueraded SYN: DNAT only at ingress");
    let masq = h.event(FlowEvent::EgressMasquerade);
    let (action, out) = h.run_egress(&dnated);
    assert_eq!(action, TC_ACT_OK);
    let port = sport_of(&out);
    assert!(lb_common::conntrack::snat_ports::contains(port), "SNAT port {port}");
    assert_eq!(
        hex(&out),
        hex(&tcp(ip(NODE_ADDR, POD_A), port, 80, Tcp::Syn)),
        "masqueraded at egress"
    );
    assert_eq!(h.event(FlowEvent::EgressMasquerade), masq + 1);
    // The reply: destination restored at ingress, source at egress.
    let (action, out) = h.run(&tcp(ip(POD_A, NODE_ADDR), 80, port, Tcp::SynAck));
    assert_eq!(action, TC_ACT_OK, "masqueraded reply to the stack");
    let unmasqueraded = tcp(ip(POD_A, CLIENT), 80, 40001, Tcp::SynAck);
    assert_eq!(hex(&out), hex(&unmasqueraded), "reply: back to the client at ingress");
    let (action, out) = h.run_egress(&unmasqueraded);
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(
        hex(&out),
        hex(&tcp(ip(SELF_VIP, CLIENT), 8080, 40001, Tcp::SynAck)),
        "reply at egress"
    );

    // Back to redirect mode: forwarded by FIB again, translated at once.
    h.datapath.maps.set_stack_forwarding(false).unwrap();
    let (action, out) = h.run(&tcp(ip(CLIENT, VIP), 40002, 8080, Tcp::Syn));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        hex(&out),
        hex(&tcp(ip(CLIENT, BACKEND).forwarded(), 40002, 80, Tcp::Syn))
    );
}

#[test]
fn xdp_hands_balanced_flows_to_the_stack_in_stack_forwarding_mode() {
    let mut h = Harness::new(&xdp_model());
    let dev = h.prepare_xdp();
    h.datapath.maps.set_stack_forwarding(true).unwrap();
    let passed = h.event(FlowEvent::XdpPassedToStack);
    let syn = tcp(ip(CLIENT, NODE_PORT_ADDR), 40000, 30081, Tcp::Syn);
    let (action, out) = h.run_xdp(dev, &syn);
    assert_eq!(action, XDP_PASS, "XDP leaves it to TC and the stack");
    assert_eq!(hex(&out), hex(&syn), "untouched");
    assert_eq!(h.event(FlowEvent::XdpPassedToStack), passed + 1, "counted");
    // TC continues the flow XDP recorded, and hands it to the stack.
    let (action, out) = h.run(&syn);
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(hex(&out), hex(&tcp(ip(CLIENT, POD_A), 40000, 80, Tcp::Syn)));
}

#[test]
fn xdp_passes_flows_to_a_host_network_endpoint_to_tc_unmasqueraded() {
    let mut h = Harness::new(&host_endpoint_model());
    let dev = h.prepare_xdp();
    let passed = h.event(FlowEvent::XdpPassedToStack);
    let syn = tcp(ip(CLIENT, NODE_PORT_ADDR), 40000, 30443, Tcp::Syn);
    let (action, out) = h.run_xdp(dev, &syn);
    assert_eq!(action, XDP_PASS, "a local endpoint: the stack delivers it");
    assert_eq!(hex(&out), hex(&syn), "untouched");
    assert_eq!(h.event(FlowEvent::XdpPassedToStack), passed + 1, "counted");
    // TC continues the flow XDP recorded: DNAT only (eTP Cluster, yet not masqueraded).
    let (action, out) = h.run(&syn);
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(hex(&out), hex(&tcp(ip(CLIENT, NODE_ADDR), 40000, 6443, Tcp::Syn)));
}

// ---- Upgrades -----------------------------------------------------------------

/// A test's bpf root: its pins are removed however the test ends.
struct PinRoot(std::path::PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        lb_agent::datapath::load::remove_pins(&self.0);
    }
}

fn forward_key(sport: u16) -> lb_common::CtKey {
    lb_common::CtKey {
        src_addr: lb_agent::sync::raw_addr(v4(CLIENT)),
        dst_addr: lb_agent::sync::raw_addr(v4(VIP)),
        src_port: sport,
        dst_port: 8080,
        proto: lb_common::proto::TCP,
        kind: lb_common::CtKind::Forward as u8,
        _pad: [0; 2],
    }
}

#[test]
fn an_upgrade_migrates_conntrack_newest_first_and_defers_to_the_previous_table() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use lb_common::conntrack::entry_flags::MIGRATED;
    use lb_common::{CtEntry, CtKey};
    let root = PinRoot(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/lbk-{}-migrate",
        std::process::id()
    )));
    let backends = [([198, 18, 1, 11], 80), ([198, 18, 1, 12], 80)];
    let model = model(vec![service_port(VIP, 8080, Protocol::Tcp, &backends)]);
    let netns = enter_test_netns();
    let opts = |conntrack_max| LoadOptions::new(Some(root.0.clone()), conntrack_max);

    // The previous agent: 100 flows that sent only a SYN (a minute to
    // live) and three established ones (a day).
    let mut old = Harness {
        datapath: Datapath::load(&opts(4096)).expect("loading the datapath (run as root)"),
        syncer: Syncer::new(),
        netns,
    };
    old.sync(&model);
    for sport in 20000..20100 {
        backend_of(&mut old, sport, Tcp::Syn);
    }
    let mut established = Vec::new();
    for sport in [30000, 30001, 30003] {
        backend_of(&mut old, sport, Tcp::Syn);
        established.push(backend_of(&mut old, sport, Tcp::Ack));
    }
    let Harness { datapath, netns, .. } = old;
    drop(datapath);

    // The next agent has room for 64 entries: the established flows'
    // (they expire last) are among those kept, the rest is counted.
    let datapath = Datapath::load(&opts(64)).expect("loading the next datapath");
    let report = datapath.migrated()[lb_common::map_names::CONNTRACK];
    assert_eq!(
        (report.copied, report.dropped, report.skipped),
        (64, 206 - 64, 0),
        "{report:?}"
    );
    let mut h = Harness {
        datapath,
        syncer: Syncer::new(),
        netns,
    };
    let previous = h.datapath.previous_maps().expect("the previous agent's maps");
    h.syncer.adopt(previous).expect("adopting the previous services");
    h.sync(&model);
    let conntrack = |h: &Harness| lb_agent::datapath::maps::dump(&h.datapath.maps.conntrack, "CONNTRACK").unwrap();
    let entry = |h: &Harness, sport| {
        conntrack(h)
            .into_iter()
            .find(|(k, _)| *k == forward_key(sport))
            .map(|(_, e)| e)
    };
    assert!(
        entry(&h, 30000).is_some_and(|e| e.flags & MIGRATED != 0),
        "the established flow was copied, marked as such"
    );
    let misses = |h: &Harness| h.datapath.maps.events(FlowEvent::TcpMidFlowConntrackMiss).unwrap();
    assert_eq!(backend_of(&mut h, 30000, Tcp::Ack), established[0], "keeps its backend");
    assert!(
        entry(&h, 30000).is_some_and(|e| e.flags & MIGRATED == 0),
        "taken over by the new programs"
    );

    // Until the migration is finished the previous table (which the
    // previous programs may still write) has the last word.
    let old_pin = root.0.join("migrate").join(lb_common::map_names::CONNTRACK);
    let mut old_ct: BpfHashMap<MapData, CtKey, CtEntry> =
        BpfHashMap::try_from(Map::from_map_data(MapData::from_pin(&old_pin).unwrap()).unwrap()).unwrap();
    let other = backends.iter().map(|b| b.0).find(|b| *b != established[1]).unwrap();
    let mut moved = old_ct.get(&forward_key(30001), 0).unwrap();
    moved.nat_addr = lb_agent::sync::raw_addr(v4(other));
    old_ct.insert(forward_key(30001), moved, 0).unwrap();
    assert_eq!(
        backend_of(&mut h, 30001, Tcp::Ack),
        other,
        "re-balanced by the previous programs after the copy"
    );
    // A flow only the previous table knows (one of those that did not fit).
    old_ct.insert(forward_key(30002), moved, 0).unwrap();
    assert_eq!(
        backend_of(&mut h, 30002, Tcp::Ack),
        other,
        "found in the previous table"
    );
    assert_eq!(misses(&h), 0, "no flow was balanced afresh");
    // New flows are written to both, for interfaces still running the previous programs.
    backend_of(&mut h, 40000, Tcp::Syn);
    assert!(old_ct.get(&forward_key(40000), 0).is_ok(), "new flow mirrored");

    // The second copy, once attached, takes what the previous programs
    // changed since the first and the new ones have not used yet (30003
    // re-balanced), and what they created (30004), but not what did not
    // fit the first time (a SYN-only flow).
    let mut rebalanced = old_ct.get(&forward_key(30003), 0).unwrap();
    let other3 = backends.iter().map(|b| b.0).find(|b| *b != established[2]).unwrap();
    rebalanced.nat_addr = lb_agent::sync::raw_addr(v4(other3));
    old_ct.insert(forward_key(30003), rebalanced, 0).unwrap();
    old_ct.insert(forward_key(30004), rebalanced, 0).unwrap();
    let left_out = (20000..20100)
        .find(|&sport| entry(&h, sport).is_none())
        .expect("a SYN-only flow left out");
    // Attached: the previous table goes, and is no longer written.
    h.datapath.finish_migration();
    let nat = |h: &Harness, sport| entry(h, sport).map(|e| e.nat_addr);
    assert_eq!(nat(&h, 30003), Some(rebalanced.nat_addr), "changed entry copied again");
    assert_eq!(nat(&h, 30004), Some(rebalanced.nat_addr), "new entry copied");
    assert_eq!(nat(&h, left_out), None, "what did not fit stays out");
    assert!(!old_pin.exists(), "the previous CONNTRACK is unpinned");
    backend_of(&mut h, 40001, Tcp::Syn);
    assert!(old_ct.get(&forward_key(40001), 0).is_err(), "not mirrored any more");
    assert_eq!(backend_of(&mut h, 30002, Tcp::Ack), other, "kept after the migration");
    let Harness { datapath, netns, .. } = h;
    drop(datapath);

    // The same settings again, from pins of an agent that recorded one
    // layout signature for all maps (version 1 of each): every map is
    // reused as it is.
    std::fs::remove_dir_all(root.0.join("layout")).unwrap();
    std::fs::create_dir(root.0.join("layout-0123456789abcdef")).unwrap();
    let again = Datapath::load(&opts(64)).expect("loading with the same settings");
    assert!(again.migrated().is_empty(), "{:?}", again.migrated());
    assert!(
        again.previous_maps().is_some() && !root.0.join("migrate").exists(),
        "reused, nothing moved aside"
    );
    assert!(
        root.0.join("layout").join("CONNTRACK-v1").is_dir() && !root.0.join("layout-0123456789abcdef").exists(),
        "per-map layout versions recorded instead"
    );
    drop(again);
    drop(netns);
}
