//! Counter maps: per service, per backend, per drop reason (per CPU).
//! What `iptables -t nat -vnL` counted per chain in kube-proxy.

use crate::assert_size;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}
assert_size!(TrafficCounter, 16);

/// Why a packet was dropped; the discriminant indexes DROP_STATS.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header ends beyond the packet (after pulling non-linear data).
    Truncated = 1,
    /// IPv4 header length field below 5 words or beyond the total length.
    BadIpHeader = 2,
    /// A fragment addressed to a service port: fragments are not balanced yet.
    FragmentToService = 3,
    /// A Local traffic policy and no endpoint on this node (kube-proxy drops).
    NoBackend = 4,
    /// The backend slot of the live revision was missing (update race).
    BackendSlotMissing = 5,
    /// The conntrack map refused the new flow.
    ConntrackInsert = 6,
    /// A packet rewrite or checksum helper failed.
    Rewrite = 7,
    /// The service has no usable endpoint: the client got an ICMP port
    /// unreachable (kube-proxy's REJECT).
    Rejected = 8,
    /// An address of --service-cluster-ip-range that no service has.
    UnallocatedServiceIp = 9,
    /// A source outside the frontend's loadBalancerSourceRanges.
    SourceRange = 10,
    /// No free masquerade port for this backend (all tries collided).
    SnatPortsExhausted = 11,
    /// No route from the node to where the packet must go.
    NoRoute = 12,
}

/// Something the datapath did that is worth counting but is not a drop;
/// the discriminant indexes EVENT_STATS.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    /// A TCP packet without SYN at a service frontend whose flow has no
    /// live conntrack entry: an established flow lost its entry — evicted
    /// from the full LRU table (raise --conntrack-max-per-core /
    /// --conntrack-min), idle longer than its timeout, its backend removed
    /// — or the flow predates this datapath. The flow is balanced anew
    /// (Maglev keeps its backend).
    TcpMidFlowConntrackMiss = 1,
    /// A packet the XDP path translated and sent itself (XDP_TX/REDIRECT).
    XdpForwarded = 2,
    /// A packet of a balanced flow the XDP path handed to TC untouched: next
    /// hop not resolved yet, egress device not allowed for XDP frames, TTL
    /// about to expire, or a service without endpoints (TC rejects).
    XdpPassedToStack = 3,
    /// A packet DNATed to an address of this node (a host-network
    /// endpoint), handed to the local stack; such flows are never
    /// masqueraded (local delivery skips kube-proxy's POSTROUTING too).
    LocalEndpoint = 4,
    /// A reply leaving the node from a local endpoint (or, in stack
    /// forwarding mode, a forwarded backend reply) got the frontend back as
    /// its source at TC egress.
    EgressReverseNat = 5,
    /// Stack forwarding mode: a masqueraded flow got the node address as
    /// its source at TC egress, after the stack (netfilter FORWARD) routed it.
    EgressMasquerade = 6,
}

impl FlowEvent {
    pub const ALL: [FlowEvent; 6] = [
        FlowEvent::TcpMidFlowConntrackMiss,
        FlowEvent::XdpForwarded,
        FlowEvent::XdpPassedToStack,
        FlowEvent::LocalEndpoint,
        FlowEvent::EgressReverseNat,
        FlowEvent::EgressMasquerade,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlowEvent::TcpMidFlowConntrackMiss => "tcp_mid_flow_conntrack_miss",
            FlowEvent::XdpForwarded => "xdp_forwarded",
            FlowEvent::XdpPassedToStack => "xdp_passed_to_stack",
            FlowEvent::LocalEndpoint => "local_endpoint",
            FlowEvent::EgressReverseNat => "egress_reverse_nat",
            FlowEvent::EgressMasquerade => "egress_masquerade",
        }
    }
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::Truncated,
        DropReason::BadIpHeader,
        DropReason::FragmentToService,
        DropReason::NoBackend,
        DropReason::BackendSlotMissing,
        DropReason::ConntrackInsert,
        DropReason::Rewrite,
        DropReason::Rejected,
        DropReason::UnallocatedServiceIp,
        DropReason::SourceRange,
        DropReason::SnatPortsExhausted,
        DropReason::NoRoute,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::FragmentToService => "fragment_to_service",
            DropReason::NoBackend => "no_backend",
            DropReason::BackendSlotMissing => "backend_slot_missing",
            DropReason::ConntrackInsert => "conntrack_insert",
            DropReason::Rewrite => "rewrite",
            DropReason::Rejected => "rejected_no_endpoints",
            DropReason::UnallocatedServiceIp => "unallocated_service_ip",
            DropReason::SourceRange => "source_range",
            DropReason::SnatPortsExhausted => "snat_ports_exhausted",
            DropReason::NoRoute => "no_route",
        }
    }
}
