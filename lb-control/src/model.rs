//! The model: Services + EndpointSlices → one entry per service port
//! (VIP, port, protocol) with the endpoints kube-proxy would use for it.
//!
//! `ServiceSpec`/`SliceSpec` are the normalized, validated forms of the
//! Kubernetes objects (API defaults applied); every source produces them, so
//! the manifests source and the Kubernetes source share the semantics here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_common::{ServiceScope, svc_flags};

/// Label kube-proxy honours: a service with it belongs to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes protocol name; absent means TCP (API default).
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }

    pub fn from_ip_proto(p: u8) -> Option<Self> {
        match p {
            lb_common::proto::TCP => Some(Protocol::Tcp),
            lb_common::proto::UDP => Some(Protocol::Udp),
            lb_common::proto::SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::proto::TCP,
            Protocol::Udp => lb_common::proto::UDP,
            Protocol::Sctp => lb_common::proto::SCTP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A problem with one field of an object, named by its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// Port name ("" when the service has a single unnamed port).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
    /// NodePort/LoadBalancer services: the port opened on every node address.
    pub node_port: Option<u16>,
}

/// An address prefix (`198.18.0.0/16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix as u32)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix as u32)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (like 198.18.0.0/16)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One `--nodeport-addresses` entry (kube-proxy's nodePortAddresses): a
/// CIDR, or `primary` (the Node object's primary address per family),
/// `localhost` (127.0.0.0/8, ::1) or `all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(Cidr),
    Primary,
    Localhost,
    All,
}

impl NodePortAddress {
    /// Whether NodePorts listen on `ip`, given the node's primary addresses.
    pub fn matches(&self, ip: IpAddr, primary: &[IpAddr]) -> bool {
        match self {
            NodePortAddress::Cidr(c) => c.contains(ip),
            NodePortAddress::Primary => primary.contains(&ip),
            NodePortAddress::Localhost => ip.is_loopback(),
            NodePortAddress::All => true,
        }
    }
}

impl std::str::FromStr for NodePortAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "primary" => Ok(NodePortAddress::Primary),
            "localhost" => Ok(NodePortAddress::Localhost),
            "all" => Ok(NodePortAddress::All),
            other => other
                .parse()
                .map(NodePortAddress::Cidr)
                .map_err(|e| format!("{e}, primary, localhost or all")),
        }
    }
}

impl fmt::Display for NodePortAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodePortAddress::Cidr(c) => c.fmt(f),
            NodePortAddress::Primary => f.write_str("primary"),
            NodePortAddress::Localhost => f.write_str("localhost"),
            NodePortAddress::All => f.write_str("all"),
        }
    }
}

/// spec.type, with ExternalName handled as `Skip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Why a service is deliberately not proxied (as kube-proxy skips it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    Headless,
    ExternalName,
    OtherProxy(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    pub skip: Option<Skip>,
    /// `internalTrafficPolicy: Local`: cluster-internal traffic only to this node's endpoints.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (used by NodePort/LoadBalancer).
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds (0: no affinity).
    pub affinity_timeout: u32,
    pub kind: ServiceKind,
    /// spec.externalIPs: captured on every node like the cluster IP.
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress[].ip with ipMode VIP or unset (kube-proxy
    /// leaves other modes, e.g. Proxy, to the load balancer).
    pub load_balancer_ips: Vec<IpAddr>,
    /// spec.loadBalancerSourceRanges, both families (each load-balancer IP
    /// is guarded by the ranges of its own family only).
    pub source_ranges: Vec<Cidr>,
    /// spec.healthCheckNodePort (LoadBalancer with eTP Local).
    pub health_check_node_port: Option<u16>,
    /// The LB_ALGORITHM_ANNOTATION, overriding --lb-algorithm.
    pub lb_algorithm: Option<LbAlgorithm>,
    /// Values skipped as kube-proxy skips them (the rest of the service is
    /// programmed); the sources log them.
    pub ignored: Vec<FieldError>,
}

/// How a new flow's backend is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbAlgorithm {
    /// Uniform random (kube-proxy's statistic match).
    Random,
    /// Maglev consistent hashing of the flow.
    Maglev,
}

impl std::str::FromStr for LbAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(LbAlgorithm::Random),
            "maglev" => Ok(LbAlgorithm::Maglev),
            other => Err(format!("unknown algorithm {other:?} (random or maglev)")),
        }
    }
}

/// Per-service override of --lb-algorithm.
pub const LB_ALGORITHM_ANNOTATION: &str = "lb-agent.io/lb-algorithm";

/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

fn port_number(field: &str, value: i32) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| field_err(field, format!("port {value} is outside 1-65535")))
}

fn parse_ip(field: &str, value: &str) -> Result<IpAddr, FieldError> {
    value
        .parse()
        .map_err(|_| field_err(field, format!("{value:?} is not an IP address")))
}

fn namespace_of(ns: &Option<String>) -> String {
    ns.clone().unwrap_or_else(|| "default".to_string())
}

impl ServiceSpec {
    /// Validates a Service and applies the API server's defaults (type
    /// ClusterIP, protocol TCP, targetPort = port).
    pub fn from_k8s(svc: &Service) -> Result<Self, FieldError> {
        let name = svc
            .metadata
            .name
            .clone()
            .ok_or_else(|| field_err("metadata.name", "missing"))?;
        let namespace = namespace_of(&svc.metadata.namespace);
        let spec = svc.spec.clone().unwrap_or_default();
        let mut skip = None;
        if let Some(proxy) = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
        {
            skip = Some(Skip::OtherProxy(proxy.clone()));
        }
        if spec.type_.as_deref() == Some("ExternalName") {
            skip = Some(Skip::ExternalName);
        }
        match spec.type_.as_deref() {
            None | Some("ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") => {}
            Some(other) => return Err(field_err("spec.type", format!("unknown service type {other:?}"))),
        }

        let raw_ips: Vec<(String, String)> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
                .collect(),
            (_, Some(ip)) => vec![("spec.clusterIP".to_string(), ip.clone())],
            _ => vec![],
        };
        let mut cluster_ips = Vec::new();
        for (field, ip) in &raw_ips {
            if ip == "None" {
                skip.get_or_insert(Skip::Headless);
                continue;
            }
            if ip.is_empty() {
                continue;
            }
            cluster_ips.push(parse_ip(field, ip)?);
        }
        if cluster_ips.is_empty() && skip.is_none() {
            return Err(field_err(
                "spec.clusterIP",
                "missing: the API server allocates it; a manifest must give the allocated address",
            ));
        }

        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("spec.ports[{i}].{f}");
            let port = port_number(&field("port"), p.port)?;
            let protocol = Protocol::parse(p.protocol.as_deref()).map_err(|m| field_err(field("protocol"), m))?;
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(port_number(&field("targetPort"), *n)?),
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => TargetPort::Number(port_number(&field("targetPort"), n)?),
                    Err(_) => TargetPort::Name(s.clone()),
                },
            };
            let name = p.name.clone().unwrap_or_default();
            if ports.iter().any(|q: &ServicePortSpec| q.name == name) {
                return Err(field_err(field("name"), format!("duplicate port name {name:?}")));
            }
            let node_port = p.node_port.map(|n| port_number(&field("nodePort"), n)).transpose()?;
            ports.push(ServicePortSpec {
                name,
                port,
                protocol,
                target_port,
                node_port,
            });
        }
        if ports.is_empty() && skip.is_none() {
            return Err(field_err("spec.ports", "a service needs at least one port"));
        }
        let affinity_timeout = match spec.session_affinity.as_deref() {
            None | Some("None") => 0,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
                u32::try_from(timeout)
                    .ok()
                    .filter(|t| (1..=86_400).contains(t))
                    .ok_or_else(|| {
                        field_err(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{timeout} is outside 1-86400"),
                        )
                    })?
            }
            Some(other) => {
                return Err(field_err(
                    "spec.sessionAffinity",
                    format!("unknown value {other:?} (None or ClientIP)"),
                ));
            }
        };
        let policy = |field: &str, value: &Option<String>| match value.as_deref() {
            None | Some("Cluster") => Ok(false),
            Some("Local") => Ok(true),
            Some(other) => Err(field_err(field, format!("unknown policy {other:?} (Cluster or Local)"))),
        };
        let kind = match spec.type_.as_deref() {
            Some("NodePort") => ServiceKind::NodePort,
            Some("LoadBalancer") => ServiceKind::LoadBalancer,
            _ => ServiceKind::ClusterIp,
        };
        // kube-proxy (MapIPsByIPFamily / MapCIDRsByIPFamily) skips an
        // address or range it cannot parse and programs the rest.
        let mut ignored = Vec::new();
        let mut tolerant_ip = |field: String, value: &str| match parse_ip(&field, value.trim()) {
            Ok(ip) => Some(ip),
            Err(e) => {
                ignored.push(e);
                None
            }
        };
        let external_ips: Vec<IpAddr> = spec
            .external_ips
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, ip)| tolerant_ip(format!("spec.externalIPs[{i}]"), ip))
            .collect();
        let mut load_balancer_ips = Vec::new();
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // kube-proxy's IsVIPMode: only ipMode VIP (or unset) is captured
            // on the node; with Proxy (or anything else) the load balancer
            // delivers to the node itself.
            if let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty())
                && matches!(ing.ip_mode.as_deref(), None | Some("VIP"))
                && let Some(ip) = tolerant_ip(format!("status.loadBalancer.ingress[{i}].ip"), ip)
            {
                load_balancer_ips.push(ip);
            }
        }
        let source_ranges = spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, r)| {
                let r = r.trim();
                // ParseCIDRSloppy: a range needs its prefix length.
                match r.parse::<Cidr>().and_then(|c| {
                    if r.contains('/') {
                        Ok(c)
                    } else {
                        Err(format!("{r:?} is not a CIDR (like 198.18.0.0/16)"))
                    }
                }) {
                    Ok(c) => Some(c),
                    Err(_) if r.is_empty() => None,
                    Err(m) => {
                        ignored.push(field_err(format!("spec.loadBalancerSourceRanges[{i}]"), m));
                        None
                    }
                }
            })
            .collect();
        let lb_algorithm = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
            .map(|v| {
                v.parse::<LbAlgorithm>()
                    .map_err(|m| field_err(format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION}]"), m))
            })
            .transpose()?;
        let health_check_node_port = spec
            .health_check_node_port
            .map(|p| port_number("spec.healthCheckNodePort", p))
            .transpose()?;
        Ok(ServiceSpec {
            namespace,
            name,
            cluster_ips,
            ports,
            skip,
            internal_local: policy("spec.internalTrafficPolicy", &spec.internal_traffic_policy)?,
            external_local: policy("spec.externalTrafficPolicy", &spec.external_traffic_policy)?,
            affinity_timeout,
            kind,
            external_ips,
            load_balancer_ips,
            source_ranges,
            health_check_node_port,
            lb_algorithm,
            ignored,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    /// None: no (valid) number; kube-proxy ignores such a port, and so
    /// does the model.
    pub port: Option<u16>,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// Topology hints: zones / nodes this endpoint should serve.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub namespace: String,
    pub name: String,
    pub service_name: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointSpec>,
    /// Values skipped as kube-proxy skips them; the sources log them.
    pub ignored: Vec<FieldError>,
    /// `addressType: IPv6`.
    pub ipv6: bool,
    /// The endpoints controller's `endpoints.kubernetes.io/last-change-trigger-time`:
    /// when the change it carries happened (network programming latency).
    pub trigger_time: Option<std::time::SystemTime>,
}

/// The annotation the endpoints controller sets to when a slice's change began.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl SliceSpec {
    /// Validates an EndpointSlice. `Ok(None)`: a slice kube-proxy ignores
    /// (FQDN address type, or no service-name label).
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Option<Self>, FieldError> {
        let name = slice
            .metadata
            .name
            .clone()
            .ok_or_else(|| field_err("metadata.name", "missing"))?;
        let namespace = namespace_of(&slice.metadata.namespace);
        let Some(service_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
        else {
            return Ok(None);
        };
        match slice.address_type.as_str() {
            "IPv4" | "IPv6" => {}
            "FQDN" => return Ok(None),
            other => return Err(field_err("addressType", format!("unknown address type {other:?}"))),
        }
        let mut ports = Vec::new();
        let mut ignored = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("ports[{i}].{f}");
            // A port without a valid number is kept (so it matches its
            // service port) but contributes no endpoints.
            let port = match p.port.map(|n| port_number(&field("port"), n)) {
                Some(Ok(n)) => Some(n),
                Some(Err(e)) => {
                    ignored.push(e);
                    None
                }
                None => {
                    ignored.push(field_err(field("port"), "missing"));
                    None
                }
            };
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol: Protocol::parse(p.protocol.as_deref()).map_err(|m| field_err(field("protocol"), m))?,
            });
        }
        let mut endpoints = Vec::new();
        for (i, e) in slice.endpoints.iter().enumerate() {
            // kube-proxy programs the first address of an endpoint.
            let Some(first) = e.addresses.first() else {
                return Err(field_err(format!("endpoints[{i}].addresses"), "empty"));
            };
            let address = parse_ip(&format!("endpoints[{i}].addresses[0]"), first)?;
            let family_ok = match slice.address_type.as_str() {
                "IPv4" => address.is_ipv4(),
                _ => address.is_ipv6(),
            };
            if !family_ok {
                return Err(field_err(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{address} does not match addressType {}", slice.address_type),
                ));
            }
            // As kube-proxy reads them: unset `ready` and `serving` mean
            // true, unset `terminating` means false.
            let cond = e.conditions.clone().unwrap_or_default();
            let hints = e.hints.clone().unwrap_or_default();
            endpoints.push(EndpointSpec {
                address,
                ready: cond.ready.unwrap_or(true),
                serving: cond.serving.unwrap_or(true),
                terminating: cond.terminating.unwrap_or(false),
                node_name: e.node_name.clone(),
                zone_hints: hints.for_zones.into_iter().flatten().map(|z| z.name).collect(),
                node_hints: hints.for_nodes.into_iter().flatten().map(|n| n.name).collect(),
            });
        }
        // An unreadable time is left out (kube-proxy logs and skips it).
        let trigger_time = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(std::time::SystemTime::from);
        Ok(Some(SliceSpec {
            namespace,
            name,
            service_name,
            ports,
            endpoints,
            ignored,
            ipv6: slice.address_type == "IPv6",
            trigger_time,
        }))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// The primary address per family: the first InternalIP, else the
    /// first ExternalIP (kube-proxy's GetNodeHostIPs, for `primary`).
    pub primary: Vec<IpAddr>,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// metadata.deletionTimestamp is set.
    pub deleting: bool,
    /// Keys of spec.taints.
    pub taints: Vec<String>,
    /// Values skipped; the sources log them.
    pub ignored: Vec<FieldError>,
}

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeSpec {
    pub fn from_k8s(node: &Node) -> Result<Self, FieldError> {
        let name = node
            .metadata
            .name
            .clone()
            .ok_or_else(|| field_err("metadata.name", "missing"))?;
        let mut addresses = Vec::new();
        let mut internal = Vec::new();
        let mut ignored = Vec::new();
        for (i, a) in node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .enumerate()
        {
            if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
                // A bad address must not lose the node (its eligibility).
                match parse_ip(&format!("status.addresses[{i}].address"), &a.address) {
                    Ok(ip) => {
                        addresses.push(ip);
                        internal.push(a.type_ == "InternalIP");
                    }
                    Err(e) => ignored.push(e),
                }
            }
        }
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned();
        let taints = node
            .spec
            .iter()
            .flat_map(|s| s.taints.iter().flatten())
            .map(|t| t.key.clone())
            .collect();
        let mut primary: Vec<IpAddr> = Vec::new();
        for want_internal in [true, false] {
            for (ip, _) in addresses.iter().zip(&internal).filter(|(_, i)| **i == want_internal) {
                if !primary.iter().any(|p| p.is_ipv4() == ip.is_ipv4()) {
                    primary.push(*ip);
                }
            }
        }
        Ok(NodeSpec {
            name,
            addresses,
            primary,
            zone,
            deleting: node.metadata.deletion_timestamp.is_some(),
            taints,
            ignored,
        })
    }

    /// kube-proxy's node eligibility for /healthz: not being deleted and
    /// not tainted for deletion by the cluster autoscaler, so load
    /// balancers drain the node first.
    pub fn eligible(&self) -> bool {
        !self.deleting && !self.taints.iter().any(|t| t == TO_BE_DELETED_TAINT)
    }
}

/// What every source hands the model: the current set of objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: Vec<ServiceSpec>,
    pub slices: Vec<SliceSpec>,
    pub nodes: Vec<NodeSpec>,
}

/// Where a service port is reached: the SERVICES map key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// `Cluster` for every frontend; `Internal` for the second entry of an
    /// externalTrafficPolicy Local frontend (in-cluster sources).
    pub scope: ServiceScope,
}

impl Frontend {
    /// The frontend's `Cluster` entry (the one every packet finds first).
    pub fn new(ip: IpAddr, port: u16, protocol: Protocol) -> Self {
        Frontend {
            ip,
            port,
            protocol,
            scope: ServiceScope::Cluster,
        }
    }
}

/// How a scope is shown (`inspect`, logs).
pub fn scope_name(scope: ServiceScope) -> &'static str {
    match scope {
        ServiceScope::Cluster => "cluster",
        ServiceScope::Internal => "internal",
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol)?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol)?,
        }
        if self.scope != ServiceScope::Cluster {
            write!(f, " ({})", scope_name(self.scope))?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// One service port as programmed: kube-proxy's ServicePortName + frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name`, as kube-proxy names it in logs and chains.
    pub name: String,
    pub frontend: Frontend,
    pub endpoints: BTreeSet<Endpoint>,
    /// ClientIP session affinity timeout in seconds (0: none).
    pub affinity_timeout: u32,
    /// `lb_common::svc_flags` (masquerading, source ranges).
    pub flags: u32,
    /// Maglev table size (0: uniform random pick).
    pub table_size: u32,
    /// loadBalancerSourceRanges of a load-balancer frontend.
    pub source_ranges: Vec<Cidr>,
    /// UDP ports only (empty otherwise): the addresses of every *serving*
    /// endpoint of the port, on any node, terminating or not, whatever the
    /// traffic policy or topology. After a sync, conntrack entries of this
    /// frontend towards other addresses are cleared so their flows start
    /// afresh (kube-proxy's CleanStaleEntries); while it is empty nothing
    /// is cleared. TCP flows are never cleared: they end on their own.
    pub udp_serving: BTreeSet<IpAddr>,
}

impl ServicePort {
    /// A plain service port: no affinity, no masquerading, no source
    /// ranges; its endpoints are all the serving ones.
    pub fn new(name: impl Into<String>, frontend: Frontend, endpoints: BTreeSet<Endpoint>) -> Self {
        let udp_serving = match frontend.protocol {
            Protocol::Udp => endpoints.iter().map(|e| e.ip).collect(),
            _ => BTreeSet::new(),
        };
        ServicePort {
            name: name.into(),
            frontend,
            endpoints,
            affinity_timeout: 0,
            flags: 0,
            table_size: 0,
            source_ranges: Vec::new(),
            udp_serving,
        }
    }
}

/// Why an object contributed nothing; logged, not fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelWarning(pub String);

impl fmt::Display for ModelWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub services: BTreeMap<Frontend, ServicePort>,
    /// Cluster IPs: their ports without a service are rejected.
    pub cluster_ips: BTreeSet<IpAddr>,
    /// healthCheckNodePort → the service and its local endpoint count.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Service ports with a Local traffic policy, endpoints, but none on
    /// this node, as (IPv4, external policy, port name): kube-proxy's
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total`.
    pub no_local_endpoints: BTreeSet<(bool, bool, String)>,
}

impl Model {
    /// A model of just these service ports.
    pub fn from_ports(ports: impl IntoIterator<Item = ServicePort>) -> Self {
        Model {
            services: ports.into_iter().map(|sp| (sp.frontend, sp)).collect(),
            ..Default::default()
        }
    }
}

/// What kube-proxy's health check server answers for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// Where the model is built: the node's name and zone decide which
/// endpoints are local and which topology hints apply.
/// One flag per address family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyFlags {
    pub v4: bool,
    pub v6: bool,
}

impl FamilyFlags {
    pub fn of(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() { self.v4 } else { self.v6 }
    }

    /// Which families `ips` hold.
    pub fn holding<'a>(ips: impl IntoIterator<Item = &'a IpAddr>) -> Self {
        ips.into_iter().fold(FamilyFlags::default(), |f, ip| FamilyFlags {
            v4: f.v4 || ip.is_ipv4(),
            v6: f.v6 || ip.is_ipv6(),
        })
    }
}

#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    pub name: String,
    pub zone: Option<String>,
    /// This node's addresses NodePorts listen on (--nodeport-addresses).
    pub nodeport_addrs: Vec<IpAddr>,
    /// Every address of this node: a loadBalancerSourceRanges CIDR holding
    /// one lets the node reach the load-balancer IPs (kube-proxy's allowFromNode).
    pub node_addrs: Vec<IpAddr>,
    /// --masquerade-all.
    pub masquerade_all: bool,
    /// --cluster-cidr given for IPv4 / for IPv6: sources outside it are
    /// masqueraded (per family, as kube-proxy runs one proxier per family).
    pub cluster_cidr_known: FamilyFlags,
    /// Table size of services using Maglev (--maglev-table-size).
    pub maglev_table_size: u32,
    /// Table size for services without the annotation: the Maglev size
    /// with --lb-algorithm maglev, 0 (random) otherwise.
    pub default_table_size: u32,
}

impl NodeContext {
    /// The node named `name`, with its zone from the snapshot's Node object.
    pub fn from_snapshot(name: &str, snapshot: &Snapshot) -> Self {
        let zone = snapshot
            .nodes
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| n.zone.clone());
        NodeContext {
            name: name.to_string(),
            zone,
            ..Default::default()
        }
    }
}

impl Model {
    /// Builds the model with kube-proxy's endpoint rules (pkg/proxy
    /// endpointslicecache + topology.go): slices merged and de-duplicated,
    /// slice ports matched to service ports by name and protocol, ready
    /// endpoints used and serving+terminating ones only when none is ready
    /// (KEP-1669), topology hints when every ready endpoint has them, and
    /// `internalTrafficPolicy: Local` limited to this node's endpoints.
    pub fn build(snapshot: &Snapshot, node: &NodeContext) -> (Model, Vec<ModelWarning>) {
        let mut model = Model::default();
        let mut warnings = Vec::new();
        let mut slices_of: HashMap<(&str, &str), Vec<&SliceSpec>> = HashMap::new();
        for slice in &snapshot.slices {
            slices_of
                .entry((&slice.namespace, &slice.service_name))
                .or_default()
                .push(slice);
        }
        for slices in slices_of.values_mut() {
            // kube-proxy reads a service's slices in name order; the first
            // mention of an endpoint wins (a local one is preferred).
            slices.sort_by(|a, b| a.name.cmp(&b.name));
        }
        for svc in &snapshot.services {
            if svc.skip.is_some() {
                continue;
            }
            let slices = slices_of
                .get(&(svc.namespace.as_str(), svc.name.as_str()))
                .map_or(&[][..], Vec::as_slice);
            for &ip in &svc.cluster_ips {
                model.cluster_ips.insert(ip);
            }
            for sp in &svc.ports {
                let name = format!("{}/{}:{}", svc.namespace, svc.name, sp.name);
                for frontend in frontends(svc, sp, node) {
                    if let Some(existing) = model.services.get(&frontend.frontend) {
                        warnings.push(ModelWarning(format!(
                            "{name}: frontend {} is already used by {}; ignored",
                            frontend.frontend, existing.name
                        )));
                        continue;
                    }
                    let candidates = merged_endpoints(sp, frontend.ip.is_ipv4(), slices, &node.name);
                    let local_only = if frontend.external {
                        svc.external_local
                    } else {
                        svc.internal_local
                    };
                    let endpoints = if local_only {
                        local_endpoints(&candidates)
                    } else {
                        cluster_endpoints(&candidates, node)
                    };
                    let all_endpoints = cluster_endpoints(&candidates, node);
                    let mut flags = 0;
                    if local_only && endpoints.is_empty() && !all_endpoints.is_empty() {
                        flags |= svc_flags::DROP_IF_EMPTY;
                        // kube-proxy's "has no local endpoints" DROP, counted
                        // once per service port, family and policy.
                        model
                            .no_local_endpoints
                            .insert((frontend.ip.is_ipv4(), frontend.external, name.clone()));
                    }
                    // kube-proxy's KUBE-EXT short-circuit: pod and node
                    // sources of an eTP Local frontend go to all endpoints.
                    let short_circuit = frontend.external && svc.external_local;
                    if short_circuit {
                        flags |= svc_flags::IN_CLUSTER_USES_INTERNAL;
                    }
                    if frontend.external && !svc.external_local {
                        // KUBE-EXT: external traffic with policy Cluster is masqueraded.
                        flags |= svc_flags::SNAT_ALWAYS;
                    }
                    if !frontend.external && node.masquerade_all {
                        flags |= svc_flags::SNAT_ALWAYS;
                    }
                    if !frontend.external && node.cluster_cidr_known.of(frontend.ip) {
                        flags |= svc_flags::SNAT_OUTSIDE_CLUSTER;
                    }
                    let source_ranges = if frontend.load_balancer {
                        load_balancer_source_ranges(svc, frontend.ip, node)
                    } else {
                        Vec::new()
                    };
                    if !source_ranges.is_empty() {
                        flags |= svc_flags::SOURCE_RANGES;
                    }
                    let port = ServicePort {
                        name: name.clone(),
                        frontend: frontend.frontend,
                        endpoints,
                        affinity_timeout: svc.affinity_timeout,
                        flags,
                        table_size: match svc.lb_algorithm {
                            Some(LbAlgorithm::Maglev) => node.maglev_table_size,
                            Some(LbAlgorithm::Random) => 0,
                            None => node.default_table_size,
                        },
                        source_ranges,
                        udp_serving: if sp.protocol == Protocol::Udp {
                            serving_addresses(&candidates)
                        } else {
                            BTreeSet::new()
                        },
                    };
                    if short_circuit {
                        let internal = internal_port(&port, all_endpoints);
                        model.services.insert(internal.frontend, internal);
                    }
                    model.services.insert(frontend.frontend, port);
                }
            }
            // kube-proxy's NeedsHealthCheck: a LoadBalancer with eTP Local.
            if svc.kind == ServiceKind::LoadBalancer
                && svc.external_local
                && let Some(port) = svc.health_check_node_port
            {
                model.health_checks.insert(
                    port,
                    HealthCheck {
                        namespace: svc.namespace.clone(),
                        name: svc.name.clone(),
                        local_endpoints: local_ready_addresses(slices, &node.name),
                    },
                );
            }
        }
        (model, warnings)
    }
}

/// The `Internal` entry of an eTP Local frontend: every endpoint of the
/// cluster (kube-proxy's cluster policy chain), pods' sources kept and the
/// node's masqueraded (KUBE-EXT "masquerade LOCAL traffic"); the
/// frontend's source ranges apply to it too (kube-proxy's firewall check
/// comes before the short-circuit).
fn internal_port(external: &ServicePort, endpoints: BTreeSet<Endpoint>) -> ServicePort {
    let frontend = Frontend {
        scope: ServiceScope::Internal,
        ..external.frontend
    };
    ServicePort {
        name: external.name.clone(),
        frontend,
        endpoints,
        flags: svc_flags::SNAT_OUTSIDE_CLUSTER | (external.flags & svc_flags::SOURCE_RANGES),
        ..external.clone()
    }
}

/// loadBalancerSourceRanges of a load-balancer IP: those of its family
/// (kube-proxy keeps one list per family, so an IPv6-only list leaves the
/// IPv4 address open), plus the load-balancer IPs of that family when a
/// range holds a node address: kube-proxy's allowFromNode, for the node's
/// own traffic, whose source is the load-balancer IP when that IP is
/// local (and the socket hooks' stand-in for the node).
fn load_balancer_source_ranges(svc: &ServiceSpec, ip: IpAddr, node: &NodeContext) -> Vec<Cidr> {
    let mut ranges: Vec<Cidr> = svc
        .source_ranges
        .iter()
        .filter(|c| c.addr.is_ipv4() == ip.is_ipv4())
        .copied()
        .collect();
    if ranges.iter().any(|c| node.node_addrs.iter().any(|a| c.contains(*a))) {
        let host = if ip.is_ipv4() { 32 } else { 128 };
        ranges.extend(
            svc.load_balancer_ips
                .iter()
                .filter(|a| a.is_ipv4() == ip.is_ipv4())
                .map(|&addr| Cidr { addr, prefix: host }),
        );
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

/// One address a service port is reached on.
struct FrontendOf {
    frontend: Frontend,
    ip: IpAddr,
    /// Reached from outside the cluster (NodePort, externalIP, load balancer):
    /// externalTrafficPolicy applies.
    external: bool,
    load_balancer: bool,
}

/// Every frontend of one service port: cluster IPs; NodePort on each node
/// address; external IPs; load-balancer IPs (the seed: KUBE-SERVICES,
/// KUBE-NODEPORTS and KUBE-EXT all lead to the same endpoints).
fn frontends(svc: &ServiceSpec, sp: &ServicePortSpec, node: &NodeContext) -> Vec<FrontendOf> {
    let at = |ip: IpAddr, port: u16, external: bool, load_balancer: bool| FrontendOf {
        frontend: Frontend::new(ip, port, sp.protocol),
        ip,
        external,
        load_balancer,
    };
    let mut out: Vec<FrontendOf> = svc
        .cluster_ips
        .iter()
        .map(|&ip| at(ip, sp.port, false, false))
        .collect();
    if svc.kind != ServiceKind::ClusterIp
        && let Some(node_port) = sp.node_port
    {
        out.extend(node.nodeport_addrs.iter().map(|&ip| at(ip, node_port, true, false)));
    }
    out.extend(svc.external_ips.iter().map(|&ip| at(ip, sp.port, true, false)));
    if svc.kind == ServiceKind::LoadBalancer {
        out.extend(svc.load_balancer_ips.iter().map(|&ip| at(ip, sp.port, true, true)));
    }
    // Only the service's own families (its cluster IPs'), as each of
    // kube-proxy's per-family proxiers only sees services of its family: an
    // IPv4-only service gets no NodePort on the node's IPv6 addresses.
    let families = FamilyFlags::holding(&svc.cluster_ips);
    out.retain(|f| families.of(f.ip));
    out
}

/// One endpoint of a service port after merging its slices.
#[derive(Clone, Debug)]
struct Candidate<'a> {
    endpoint: Endpoint,
    spec: &'a EndpointSpec,
    local: bool,
}

fn merged_endpoints<'a>(
    sp: &ServicePortSpec,
    want_v4: bool,
    slices: &[&'a SliceSpec],
    node_name: &str,
) -> Vec<Candidate<'a>> {
    let mut merged: BTreeMap<Endpoint, Candidate<'a>> = BTreeMap::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
        else {
            continue;
        };
        // kube-proxy ignores a slice port without a number (endpointslicecache).
        let Some(port) = slice_port.port else {
            continue;
        };
        for e in &slice.endpoints {
            if e.address.is_ipv4() != want_v4 {
                continue;
            }
            let endpoint = Endpoint { ip: e.address, port };
            let local = e.node_name.as_deref() == Some(node_name);
            if local || !merged.contains_key(&endpoint) {
                merged.insert(
                    endpoint,
                    Candidate {
                        endpoint,
                        spec: e,
                        local,
                    },
                );
            }
        }
    }
    merged.into_values().collect()
}

/// kube-proxy's LocalReadyEndpoints: the distinct addresses of this node's
/// ready endpoints of the service, over all its ports (that have a number)
/// and both families. Terminating endpoints are not ready, so a node whose
/// pods are all terminating fails its health check and is drained.
fn local_ready_addresses(slices: &[&SliceSpec], node_name: &str) -> usize {
    slices
        .iter()
        .filter(|s| s.ports.iter().any(|p| p.port.is_some()))
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.ready && e.node_name.as_deref() == Some(node_name))
        .map(|e| e.address)
        .collect::<BTreeSet<_>>()
        .len()
}

fn select(candidates: &[Candidate<'_>], keep: impl Fn(&Candidate<'_>) -> bool) -> BTreeSet<Endpoint> {
    candidates.iter().filter(|c| keep(c)).map(|c| c.endpoint).collect()
}

/// Addresses of the serving endpoints (ready or terminating), as
/// kube-proxy's conntrack cleanup counts them.
fn serving_addresses(candidates: &[Candidate<'_>]) -> BTreeSet<IpAddr> {
    candidates
        .iter()
        .filter(|c| c.spec.serving)
        .map(|c| c.endpoint.ip)
        .collect()
}

/// Ready endpoints (within the topology, if hints apply), else
/// serving+terminating ones.
fn cluster_endpoints(candidates: &[Candidate<'_>], node: &NodeContext) -> BTreeSet<Endpoint> {
    let topology = topology_mode(candidates, node);
    let ready = select(candidates, |c| c.spec.ready && topology.admits(c.spec, node));
    if !ready.is_empty() {
        return ready;
    }
    select(candidates, |c| c.spec.serving && c.spec.terminating)
}

/// This node's ready endpoints, else its serving+terminating ones.
fn local_endpoints(candidates: &[Candidate<'_>]) -> BTreeSet<Endpoint> {
    let ready = select(candidates, |c| c.local && c.spec.ready);
    if !ready.is_empty() {
        return ready;
    }
    select(candidates, |c| c.local && c.spec.serving && c.spec.terminating)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Any,
    SameNode,
    SameZone,
}

impl Topology {
    fn admits(self, e: &EndpointSpec, node: &NodeContext) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameNode => e.node_hints.contains(&node.name),
            Topology::SameZone => node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
        }
    }
}

/// kube-proxy's topologyModeFromHints: hints count only when every ready
/// endpoint carries them and at least one names this node (or its zone).
fn topology_mode(candidates: &[Candidate<'_>], node: &NodeContext) -> Topology {
    let ready: Vec<&EndpointSpec> = candidates.iter().filter(|c| c.spec.ready).map(|c| c.spec).collect();
    if ready.is_empty() {
        return Topology::Any;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.contains(&node.name)) {
        return Topology::SameNode;
    }
    if let Some(zone) = &node.zone
        && ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.contains(zone))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: &str = "198.19.0.10";
    const NODE: &str = "node-1";

    fn svc(ports: Vec<ServicePortSpec>) -> ServiceSpec {
        ServiceSpec {
            namespace: "net-test".into(),
            name: "web".into(),
            cluster_ips: vec![VIP.parse().unwrap()],
            ports,
            skip: None,
            internal_local: false,
            external_local: false,
            affinity_timeout: 0,
            kind: ServiceKind::ClusterIp,
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            health_check_node_port: None,
            lb_algorithm: None,
            ignored: vec![],
        }
    }

    fn port(name: &str, port: u16, protocol: Protocol, target: TargetPort) -> ServicePortSpec {
        ServicePortSpec {
            name: name.into(),
            port,
            protocol,
            target_port: target,
            node_port: None,
        }
    }

    fn http() -> ServicePortSpec {
        port("http", 8080, Protocol::Tcp, TargetPort::Number(80))
    }

    /// An endpoint: ready unless told otherwise, on `node`.
    #[derive(Clone)]
    struct Ep(EndpointSpec);

    impl Ep {
        fn new(ip: &str, node: &str) -> Self {
            Ep(EndpointSpec {
                address: ip.parse().unwrap(),
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some(node.into()),
                zone_hints: vec![],
                node_hints: vec![],
            })
        }
        fn not_ready(mut self) -> Self {
            self.0.ready = false;
            self.0.serving = false;
            self
        }
        fn terminating(mut self, serving: bool) -> Self {
            self.0.ready = false;
            self.0.serving = serving;
            self.0.terminating = true;
            self
        }
        fn zones(mut self, zones: &[&str]) -> Self {
            self.0.zone_hints = zones.iter().map(|z| z.to_string()).collect();
            self
        }
        fn nodes(mut self, nodes: &[&str]) -> Self {
            self.0.node_hints = nodes.iter().map(|z| z.to_string()).collect();
            self
        }
    }

    fn slice(name: &str, ports: Vec<SlicePort>, eps: Vec<Ep>) -> SliceSpec {
        SliceSpec {
            namespace: "net-test".into(),
            name: name.into(),
            service_name: "web".into(),
            ports,
            endpoints: eps.into_iter().map(|e| e.0).collect(),
            ignored: vec![],
            ipv6: false,
            trigger_time: None,
        }
    }

    fn sport(name: &str, port: Option<u16>, protocol: Protocol) -> SlicePort {
        SlicePort {
            name: name.into(),
            port,
            protocol,
        }
    }

    fn http_slice(name: &str, eps: Vec<Ep>) -> SliceSpec {
        slice(name, vec![sport("http", Some(80), Protocol::Tcp)], eps)
    }

    struct Case {
        name: &'static str,
        service: ServiceSpec,
        slices: Vec<SliceSpec>,
        zone: Option<&'static str>,
        /// Frontend port and protocol looked at.
        frontend: (u16, Protocol),
        /// Endpoints programmed for it; None: no frontend at all.
        want: Option<Vec<&'static str>>,
    }

    fn case(name: &'static str, slices: Vec<SliceSpec>, want: &[&'static str]) -> Case {
        Case {
            name,
            service: svc(vec![http()]),
            slices,
            zone: None,
            frontend: (8080, Protocol::Tcp),
            want: Some(want.to_vec()),
        }
    }

    #[test]
    fn endpoint_selection_follows_kube_proxy() {
        let local_svc = ServiceSpec {
            internal_local: true,
            ..svc(vec![http()])
        };
        let mut cases = vec![
            case(
                "ready endpoints of all slices, de-duplicated",
                vec![
                    http_slice(
                        "web-a",
                        vec![Ep::new("198.18.1.1", NODE), Ep::new("198.18.1.2", "node-2")],
                    ),
                    http_slice(
                        "web-b",
                        vec![Ep::new("198.18.1.2", "node-2"), Ep::new("198.18.1.3", "node-2")],
                    ),
                ],
                &["198.18.1.1:80", "198.18.1.2:80", "198.18.1.3:80"],
            ),
            case(
                "not-ready endpoints are left out",
                vec![http_slice(
                    "s",
                    vec![Ep::new("198.18.1.1", NODE), Ep::new("198.18.1.2", NODE).not_ready()],
                )],
                &["198.18.1.1:80"],
            ),
            case(
                "terminating endpoints are not used while one is ready",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE),
                        Ep::new("198.18.1.2", NODE).terminating(true),
                    ],
                )],
                &["198.18.1.1:80"],
            ),
            case(
                "none ready: serving+terminating ones are used (KEP-1669)",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE).not_ready(),
                        Ep::new("198.18.1.2", NODE).terminating(true),
                        Ep::new("198.18.1.3", NODE).terminating(false),
                    ],
                )],
                &["198.18.1.2:80"],
            ),
            case("no endpoints at all: the frontend exists with none", vec![], &[]),
            case(
                "slice ports are matched by name, the number comes from the slice",
                vec![slice(
                    "s",
                    vec![
                        sport("metrics", Some(9100), Protocol::Tcp),
                        sport("http", Some(8000), Protocol::Tcp),
                    ],
                    vec![Ep::new("198.18.1.1", NODE)],
                )],
                &["198.18.1.1:8000"],
            ),
            case(
                "a slice port of another protocol does not match",
                vec![slice(
                    "s",
                    vec![sport("http", Some(80), Protocol::Udp)],
                    vec![Ep::new("198.18.1.1", NODE)],
                )],
                &[],
            ),
            case(
                "IPv6 endpoints do not serve an IPv4 frontend",
                vec![http_slice(
                    "s",
                    vec![Ep::new("fd00::1", NODE), Ep::new("198.18.1.1", NODE)],
                )],
                &["198.18.1.1:80"],
            ),
        ];
        cases.push(Case {
            name: "slice port without number: ignored like kube-proxy (not the targetPort)",
            slices: vec![slice(
                "s",
                vec![sport("http", None, Protocol::Tcp)],
                vec![Ep::new("198.18.1.1", NODE)],
            )],
            service: svc(vec![port("http", 8080, Protocol::Tcp, TargetPort::Number(8081))]),
            ..case("", vec![], &[])
        });
        cases.push(Case {
            name: "internalTrafficPolicy Local: only this node's endpoints",
            service: local_svc.clone(),
            ..case(
                "",
                vec![http_slice(
                    "s",
                    vec![Ep::new("198.18.1.1", NODE), Ep::new("198.18.1.2", "node-2")],
                )],
                &["198.18.1.1:80"],
            )
        });
        cases.push(Case {
            name: "internalTrafficPolicy Local without a local endpoint: none (drop)",
            service: local_svc.clone(),
            ..case("", vec![http_slice("s", vec![Ep::new("198.18.1.2", "node-2")])], &[])
        });
        cases.push(Case {
            name: "internalTrafficPolicy Local falls back to local serving+terminating",
            service: local_svc,
            ..case(
                "",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE).terminating(true),
                        Ep::new("198.18.1.2", "node-2"),
                    ],
                )],
                &["198.18.1.1:80"],
            )
        });
        cases.push(Case {
            name: "zone hints on every ready endpoint: this zone's endpoints",
            zone: Some("zone-a"),
            ..case(
                "",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE).zones(&["zone-a"]),
                        Ep::new("198.18.1.2", "node-2").zones(&["zone-b"]),
                    ],
                )],
                &["198.18.1.1:80"],
            )
        });
        cases.push(Case {
            name: "an endpoint without hints: hints are ignored",
            zone: Some("zone-a"),
            ..case(
                "",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE).zones(&["zone-a"]),
                        Ep::new("198.18.1.2", "node-2"),
                    ],
                )],
                &["198.18.1.1:80", "198.18.1.2:80"],
            )
        });
        cases.push(Case {
            name: "no endpoint hinted for this zone: hints are ignored",
            zone: Some("zone-c"),
            ..case(
                "",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE).zones(&["zone-a"]),
                        Ep::new("198.18.1.2", "node-2").zones(&["zone-b"]),
                    ],
                )],
                &["198.18.1.1:80", "198.18.1.2:80"],
            )
        });
        cases.push(Case {
            name: "node without a zone label: zone hints are ignored",
            ..case(
                "",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE).zones(&["zone-a"]),
                        Ep::new("198.18.1.2", "node-2").zones(&["zone-b"]),
                    ],
                )],
                &["198.18.1.1:80", "198.18.1.2:80"],
            )
        });
        cases.push(Case {
            name: "node hints (PreferSameNode) win over zone hints",
            zone: Some("zone-a"),
            ..case(
                "",
                vec![http_slice(
                    "s",
                    vec![
                        Ep::new("198.18.1.1", NODE).zones(&["zone-a"]).nodes(&[NODE]),
                        Ep::new("198.18.1.2", "node-2").zones(&["zone-a"]).nodes(&["node-2"]),
                    ],
                )],
                &["198.18.1.1:80"],
            )
        });
        for skip in [Skip::Headless, Skip::ExternalName, Skip::OtherProxy("other".into())] {
            cases.push(Case {
                name: "skipped services program nothing",
                service: ServiceSpec {
                    skip: Some(skip),
                    ..svc(vec![http()])
                },
                want: None,
                ..case("", vec![http_slice("s", vec![Ep::new("198.18.1.1", NODE)])], &[])
            });
        }
        cases.push(Case {
            name: "SCTP ports are programmed, matched to the slice's SCTP port",
            service: svc(vec![port("sig", 9000, Protocol::Sctp, TargetPort::Number(9001))]),
            slices: vec![slice(
                "s",
                vec![sport("sig", Some(9001), Protocol::Sctp)],
                vec![Ep::new("198.18.1.1", NODE)],
            )],
            frontend: (9000, Protocol::Sctp),
            ..case("", vec![], &["198.18.1.1:9001"])
        });
        cases.push(Case {
            name: "an SCTP service port takes no TCP slice port of its name",
            service: svc(vec![port("sig", 9000, Protocol::Sctp, TargetPort::Number(9001))]),
            slices: vec![slice(
                "s",
                vec![sport("sig", Some(9001), Protocol::Tcp)],
                vec![Ep::new("198.18.1.1", NODE)],
            )],
            frontend: (9000, Protocol::Sctp),
            ..case("", vec![], &[])
        });

        for c in cases {
            let snapshot = Snapshot {
                services: vec![c.service.clone()],
                slices: c.slices.clone(),
                nodes: vec![],
            };
            let node = NodeContext {
                name: NODE.into(),
                zone: c.zone.map(String::from),
                ..Default::default()
            };
            let (model, _) = Model::build(&snapshot, &node);
            let frontend = Frontend::new(VIP.parse().unwrap(), c.frontend.0, c.frontend.1);
            let got = model
                .services
                .get(&frontend)
                .map(|sp| sp.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>());
            let want = c.want.map(|w| w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert_eq!(got, want, "case: {}", c.name);
        }
    }

    /// kube-proxy's conntrack cleanup counts every *serving* endpoint of a
    /// UDP port — terminating ones included, whatever the node, the
    /// traffic policy or the hints — and never looks at TCP ports.
    #[test]
    fn udp_serving_set_is_every_serving_endpoint_regardless_of_policy() {
        let dns = port("dns", 53, Protocol::Udp, TargetPort::Number(5353));
        let service = ServiceSpec {
            internal_local: true,
            ..svc(vec![dns, http()])
        };
        let eps = vec![
            Ep::new("198.18.1.1", NODE),
            Ep::new("198.18.2.1", "node-2"),
            Ep::new("198.18.1.2", NODE).terminating(true),
            Ep::new("198.18.1.3", NODE).terminating(false),
            Ep::new("198.18.1.4", NODE).not_ready(),
        ];
        let slices = vec![slice(
            "s",
            vec![
                sport("dns", Some(5353), Protocol::Udp),
                sport("http", Some(80), Protocol::Tcp),
            ],
            eps,
        )];
        let snapshot = Snapshot {
            services: vec![service],
            slices,
            nodes: vec![],
        };
        let node = NodeContext {
            name: NODE.into(),
            ..Default::default()
        };
        let (model, _) = Model::build(&snapshot, &node);
        let at = |port, protocol| &model.services[&Frontend::new(VIP.parse().unwrap(), port, protocol)];
        let udp = at(53, Protocol::Udp);
        let ips = |l: &[&str]| l.iter().map(|ip| ip.parse().unwrap()).collect::<BTreeSet<IpAddr>>();
        assert_eq!(udp.udp_serving, ips(&["198.18.1.1", "198.18.1.2", "198.18.2.1"]));
        assert_eq!(
            udp.endpoints.iter().map(|e| e.ip).collect::<BTreeSet<_>>(),
            ips(&["198.18.1.1"]),
            "new flows: local ready endpoints only"
        );
        assert!(at(8080, Protocol::Tcp).udp_serving.is_empty());
    }

    #[test]
    fn external_frontends_follow_type_traffic_policy_and_ip_mode() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: net-test}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.10\n  externalIPs: [198.19.101.1]\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  loadBalancerSourceRanges: [198.18.0.0/24]\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.19.100.1}, {ip: 198.19.100.2, ipMode: Proxy}]\n";
        let svc = ServiceSpec::from_k8s(&serde_norway::from_str::<Service>(yaml).unwrap()).unwrap();
        let slice = slice(
            "s",
            vec![sport("http", Some(8080), Protocol::Tcp)],
            vec![Ep::new("198.18.1.1", NODE), Ep::new("198.18.2.1", "node-2")],
        );
        let node = NodeContext {
            name: NODE.into(),
            nodeport_addrs: vec!["198.18.0.11".parse().unwrap()],
            cluster_cidr_known: FamilyFlags { v4: true, v6: true },
            ..Default::default()
        };
        let (model, warnings) = Model::build(
            &Snapshot {
                services: vec![svc],
                slices: vec![slice],
                nodes: vec![],
            },
            &node,
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let get = |ip: &str, port| &model.services[&Frontend::new(ip.parse().unwrap(), port, Protocol::Tcp)];
        let eps = |sp: &ServicePort| sp.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>();

        let cluster = get("198.19.0.10", 80);
        assert_eq!(
            eps(cluster),
            ["198.18.1.1:8080", "198.18.2.1:8080"],
            "internal traffic: all endpoints"
        );
        assert_eq!(cluster.flags, svc_flags::SNAT_OUTSIDE_CLUSTER);
        for (ip, port) in [("198.18.0.11", 30080), ("198.19.101.1", 80), ("198.19.100.1", 80)] {
            let sp = get(ip, port);
            assert_eq!(eps(sp), ["198.18.1.1:8080"], "{ip}: eTP Local keeps local endpoints");
            assert_eq!(
                sp.flags & svc_flags::SNAT_ALWAYS,
                0,
                "{ip}: eTP Local keeps the client address"
            );
        }
        let lb = get("198.19.100.1", 80);
        assert_eq!(lb.flags & svc_flags::SOURCE_RANGES, svc_flags::SOURCE_RANGES);
        assert_eq!(lb.source_ranges, vec!["198.18.0.0/24".parse::<Cidr>().unwrap()]);
        assert!(
            get("198.18.0.11", 30080).source_ranges.is_empty(),
            "source ranges guard only LB IPs"
        );
        let proxy_mode = Frontend::new("198.19.100.2".parse().unwrap(), 80, Protocol::Tcp);
        assert!(
            !model.services.contains_key(&proxy_mode),
            "ipMode Proxy is not captured"
        );
        assert_eq!(model.health_checks[&32000].local_endpoints, 1);
        assert!(model.cluster_ips.contains(&"198.19.0.10".parse().unwrap()));
    }

    /// A LoadBalancer service (LB IP 198.19.100.1, NodePort 30080 on
    /// 198.18.0.11) with `extra` spec lines, endpoints on this node and node-2.
    fn lb_model(extra: &str, eps: Vec<Ep>, node: &NodeContext) -> Model {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: net-test}}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.10\n{extra}  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 198.19.100.1}}]\n"
        );
        let svc = ServiceSpec::from_k8s(&serde_norway::from_str::<Service>(&yaml).unwrap()).unwrap();
        let slice = slice("s", vec![sport("http", Some(8080), Protocol::Tcp)], eps);
        let snapshot = Snapshot {
            services: vec![svc],
            slices: vec![slice],
            nodes: vec![],
        };
        let (model, warnings) = Model::build(&snapshot, node);
        assert!(warnings.is_empty(), "{warnings:?}");
        model
    }

    fn lb_node() -> NodeContext {
        NodeContext {
            name: NODE.into(),
            nodeport_addrs: vec!["198.18.0.11".parse().unwrap()],
            node_addrs: vec!["198.18.0.11".parse().unwrap()],
            cluster_cidr_known: FamilyFlags { v4: true, v6: true },
            ..Default::default()
        }
    }

    #[test]
    fn etp_local_frontends_send_in_cluster_sources_to_every_endpoint() {
        struct Case {
            name: &'static str,
            spec: &'static str,
            eps: Vec<Ep>,
            /// Endpoints and flags of the external entry; of the internal one (None: no such entry).
            external: (&'static [&'static str], u32),
            internal: Option<(&'static [&'static str], u32)>,
            /// Counted in no_local_endpoints: its policies (external or not).
            no_local: &'static [bool],
        }
        const LOCAL: &str = "198.18.1.1:8080";
        const REMOTE: &str = "198.18.2.1:8080";
        let both = || vec![Ep::new("198.18.1.1", NODE), Ep::new("198.18.2.1", "node-2")];
        let short = svc_flags::IN_CLUSTER_USES_INTERNAL;
        let cases = [
            Case {
                name: "eTP Local with a local endpoint: external sources local only, in-cluster all",
                spec: "  externalTrafficPolicy: Local\n",
                eps: both(),
                external: (&[LOCAL], short),
                internal: Some((&[LOCAL, REMOTE], svc_flags::SNAT_OUTSIDE_CLUSTER)),
                no_local: &[],
            },
            Case {
                name: "eTP Local without a local endpoint: external sources dropped, in-cluster reach node-2",
                spec: "  externalTrafficPolicy: Local\n",
                eps: vec![Ep::new("198.18.2.1", "node-2")],
                external: (&[], short | svc_flags::DROP_IF_EMPTY),
                internal: Some((&[REMOTE], svc_flags::SNAT_OUTSIDE_CLUSTER)),
                no_local: &[true],
            },
            Case {
                name: "eTP Local and iTP Local: the short-circuit still uses every endpoint",
                spec: "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n",
                eps: vec![Ep::new("198.18.2.1", "node-2")],
                external: (&[], short | svc_flags::DROP_IF_EMPTY),
                internal: Some((&[REMOTE], svc_flags::SNAT_OUTSIDE_CLUSTER)),
                no_local: &[false, true],
            },
            Case {
                name: "eTP Local, no endpoint anywhere: both entries empty (REJECT)",
                spec: "  externalTrafficPolicy: Local\n",
                eps: vec![],
                external: (&[], short),
                internal: Some((&[], svc_flags::SNAT_OUTSIDE_CLUSTER)),
                no_local: &[],
            },
            Case {
                name: "eTP Cluster: one entry, masqueraded",
                spec: "",
                eps: both(),
                external: (&[LOCAL, REMOTE], svc_flags::SNAT_ALWAYS),
                internal: None,
                no_local: &[],
            },
        ];
        for c in cases {
            let model = lb_model(c.spec, c.eps, &lb_node());
            for (ip, port) in [("198.18.0.11", 30080), ("198.19.100.1", 80)] {
                let ip: IpAddr = ip.parse().unwrap();
                let external = Frontend::new(ip, port, Protocol::Tcp);
                let internal = Frontend {
                    scope: ServiceScope::Internal,
                    ..external
                };
                let view = |sp: &ServicePort| {
                    let eps: Vec<String> = sp.endpoints.iter().map(|e| e.to_string()).collect();
                    (eps, sp.flags)
                };
                let want = |(eps, flags): (&[&str], u32)| (eps.iter().map(|e| e.to_string()).collect(), flags);
                assert_eq!(
                    view(&model.services[&external]),
                    want(c.external),
                    "{}: {external}",
                    c.name
                );
                assert_eq!(
                    model.services.get(&internal).map(view),
                    c.internal.map(want),
                    "{}: {internal}",
                    c.name
                );
            }
            let no_local: BTreeSet<(bool, bool, String)> = c
                .no_local
                .iter()
                .map(|&external| (true, external, "net-test/web:http".to_string()))
                .collect();
            assert_eq!(model.no_local_endpoints, no_local, "{}", c.name);
            let cluster_ip = Frontend {
                scope: ServiceScope::Internal,
                ..Frontend::new("198.19.0.10".parse().unwrap(), 80, Protocol::Tcp)
            };
            assert!(
                !model.services.contains_key(&cluster_ip),
                "{}: cluster IPs have one entry",
                c.name
            );
        }
    }

    #[test]
    fn source_ranges_apply_per_family_and_let_a_listed_node_reach_its_load_balancer_ip() {
        let lb = Frontend::new("198.19.100.1".parse().unwrap(), 80, Protocol::Tcp);
        let cidrs = |list: &[&str]| list.iter().map(|c| c.parse::<Cidr>().unwrap()).collect::<Vec<_>>();
        let cases: [(&str, &str, &[&str]); 4] = [
            (
                "ranges without the node: as listed",
                "  loadBalancerSourceRanges: [198.18.0.100/32]\n",
                &["198.18.0.100/32"],
            ),
            (
                "a range holding the node: the LB IP is allowed too (allowFromNode)",
                "  loadBalancerSourceRanges: [198.18.0.0/24, 198.18.9.0/24]\n",
                &["198.18.0.0/24", "198.18.9.0/24", "198.19.100.1/32"],
            ),
            (
                "IPv6 ranges only: the IPv4 LB IP stays open",
                "  loadBalancerSourceRanges: [\"fd00:198:18::/48\"]\n",
                &[],
            ),
            (
                "mixed families: each address gets its family's ranges",
                "  loadBalancerSourceRanges: [\"fd00:198:18::/48\", 198.18.0.100/32]\n",
                &["198.18.0.100/32"],
            ),
        ];
        for (name, spec, want) in cases {
            for policy in ["", "  externalTrafficPolicy: Local\n"] {
                let model = lb_model(
                    &format!("{policy}{spec}"),
                    vec![Ep::new("198.18.1.1", NODE)],
                    &lb_node(),
                );
                let internal = Frontend {
                    scope: ServiceScope::Internal,
                    ..lb
                };
                let entries: Vec<&ServicePort> = [lb, internal].iter().filter_map(|f| model.services.get(f)).collect();
                assert_eq!(entries.len(), if policy.is_empty() { 1 } else { 2 }, "{name} {policy}");
                for sp in entries {
                    assert_eq!(sp.source_ranges, cidrs(want), "{name} {policy}: {}", sp.frontend);
                    assert_eq!(
                        sp.flags & svc_flags::SOURCE_RANGES != 0,
                        !want.is_empty(),
                        "{name} {policy}: {}",
                        sp.frontend
                    );
                }
                let node_port = Frontend::new("198.18.0.11".parse().unwrap(), 30080, Protocol::Tcp);
                assert!(
                    model.services[&node_port].source_ranges.is_empty(),
                    "{name}: NodePorts are not filtered"
                );
            }
        }
    }

    #[test]
    fn health_check_counts_distinct_local_ready_addresses_like_kube_proxy() {
        let lb = ServiceSpec {
            kind: ServiceKind::LoadBalancer,
            external_local: true,
            health_check_node_port: Some(32000),
            ..svc(vec![http(), port("dns", 53, Protocol::Udp, TargetPort::Number(5353))])
        };
        let both_ports = |eps: Vec<Ep>| {
            slice(
                "s",
                vec![
                    sport("http", Some(80), Protocol::Tcp),
                    sport("dns", Some(5353), Protocol::Udp),
                ],
                eps,
            )
        };
        let cases: Vec<(&str, ServiceSpec, Vec<SliceSpec>, Option<usize>)> = vec![
            (
                "one pod behind two ports counts once",
                lb.clone(),
                vec![both_ports(vec![Ep::new("198.18.1.1", NODE)])],
                Some(1),
            ),
            (
                "both families count (one slice each)",
                lb.clone(),
                vec![
                    both_ports(vec![Ep::new("198.18.1.1", NODE), Ep::new("198.18.1.2", NODE)]),
                    SliceSpec {
                        name: "s6".into(),
                        ..both_ports(vec![Ep::new("fd00::1", NODE)])
                    },
                ],
                Some(3),
            ),
            (
                "terminating and not-ready endpoints do not count: the node drains",
                lb.clone(),
                vec![both_ports(vec![
                    Ep::new("198.18.1.1", NODE).terminating(true),
                    Ep::new("198.18.1.2", NODE).not_ready(),
                ])],
                Some(0),
            ),
            (
                "other nodes' endpoints do not count",
                lb.clone(),
                vec![both_ports(vec![Ep::new("198.18.1.1", "node-2")])],
                Some(0),
            ),
            (
                "a slice whose only port has no number counts nothing",
                lb.clone(),
                vec![slice(
                    "s",
                    vec![sport("http", None, Protocol::Tcp)],
                    vec![Ep::new("198.18.1.1", NODE)],
                )],
                Some(0),
            ),
            (
                "externalTrafficPolicy Cluster: no health check",
                ServiceSpec {
                    external_local: false,
                    ..lb.clone()
                },
                vec![both_ports(vec![Ep::new("198.18.1.1", NODE)])],
                None,
            ),
            (
                "a NodePort service: no health check (kube-proxy's NeedsHealthCheck)",
                ServiceSpec {
                    kind: ServiceKind::NodePort,
                    ..lb.clone()
                },
                vec![both_ports(vec![Ep::new("198.18.1.1", NODE)])],
                None,
            ),
        ];
        for (name, service, slices, want) in cases {
            let (model, _) = Model::build(
                &Snapshot {
                    services: vec![service],
                    slices,
                    nodes: vec![],
                },
                &NodeContext {
                    name: NODE.into(),
                    ..Default::default()
                },
            );
            assert_eq!(
                model.health_checks.get(&32000).map(|h| h.local_endpoints),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn node_eligibility_follows_deletion_and_the_autoscaler_taint() {
        let node = |extra: &str| {
            NodeSpec::from_k8s(
                &serde_norway::from_str::<Node>(&format!(
                    "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n{extra}"
                ))
                .unwrap(),
            )
            .unwrap()
        };
        assert!(node("").eligible());
        assert!(node("spec: {taints: [{key: other, effect: NoSchedule}]}\n").eligible());
        let tainted = node("spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}\n");
        assert_eq!(tainted.taints, ["ToBeDeletedByClusterAutoscaler"]);
        assert!(!tainted.eligible());
        let deleting = node("  deletionTimestamp: '2026-01-01T00:00:00Z'\n");
        assert!(deleting.deleting && !deleting.eligible());
        let bad_address = node(
            "status: {addresses: [{type: InternalIP, address: 198.18.0.300}, {type: InternalIP, address: 198.18.0.11}]}\n",
        );
        assert_eq!(bad_address.addresses, ["198.18.0.11".parse::<IpAddr>().unwrap()]);
        assert_eq!(bad_address.ignored[0].field, "status.addresses[0].address");
        assert!(bad_address.eligible(), "a bad address does not lose the node");
    }

    #[test]
    fn multi_port_service_gets_one_frontend_per_port() {
        let snapshot = Snapshot {
            services: vec![svc(vec![
                http(),
                port("dns", 53, Protocol::Udp, TargetPort::Number(5353)),
            ])],
            slices: vec![slice(
                "s",
                vec![
                    sport("http", Some(80), Protocol::Tcp),
                    sport("dns", Some(5353), Protocol::Udp),
                ],
                vec![Ep::new("198.18.1.1", NODE)],
            )],
            nodes: vec![],
        };
        let (model, warnings) = Model::build(
            &snapshot,
            &NodeContext {
                name: NODE.into(),
                ..Default::default()
            },
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let names: Vec<String> = model.services.keys().map(|f| f.to_string()).collect();
        assert_eq!(names, ["198.19.0.10:53/UDP", "198.19.0.10:8080/TCP"]);
    }

    #[test]
    fn duplicate_frontend_is_reported_and_first_kept() {
        let a = svc(vec![http()]);
        let b = ServiceSpec {
            name: "other".into(),
            ..svc(vec![http()])
        };
        let (model, warnings) = Model::build(
            &Snapshot {
                services: vec![a, b],
                ..Default::default()
            },
            &NodeContext::default(),
        );
        assert_eq!(model.services.len(), 1);
        assert!(
            warnings[0].0.contains("already used by net-test/web:http"),
            "{warnings:?}"
        );
    }

    fn parse_service(yaml: &str) -> Result<ServiceSpec, FieldError> {
        ServiceSpec::from_k8s(&serde_norway::from_str::<Service>(yaml).unwrap())
    }

    #[test]
    fn service_defaults_and_field_errors() {
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: net-test}\nspec:\n  clusterIP: 198.19.0.10\n";
        let spec = parse_service(&format!("{base}  ports: [{{port: 8080}}]\n")).unwrap();
        assert_eq!(
            spec.ports,
            vec![port("", 8080, Protocol::Tcp, TargetPort::Number(8080))]
        );
        assert_eq!((spec.internal_local, spec.affinity_timeout), (false, 0));

        let spec = parse_service(&format!(
            "{base}  ports: [{{port: 80, targetPort: web}}]\n  sessionAffinity: ClientIP\n  internalTrafficPolicy: Local\n"
        ))
        .unwrap();
        assert_eq!(spec.ports[0].target_port, TargetPort::Name("web".into()));
        assert_eq!(
            (spec.internal_local, spec.affinity_timeout),
            (true, DEFAULT_AFFINITY_TIMEOUT)
        );

        let bad = [
            ("  ports: [{port: 8080, protocol: XTP}]\n", "spec.ports[0].protocol"),
            ("  ports: [{port: 70000}]\n", "spec.ports[0].port"),
            (
                "  ports: [{port: 80, name: a}, {port: 81, name: a}]\n",
                "spec.ports[1].name",
            ),
            (
                "  ports: [{port: 80}]\n  sessionAffinity: Cookie\n",
                "spec.sessionAffinity",
            ),
            (
                "  ports: [{port: 80}]\n  internalTrafficPolicy: Nearby\n",
                "spec.internalTrafficPolicy",
            ),
            (
                "  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
        ];
        for (tail, field) in bad {
            assert_eq!(
                parse_service(&format!("{base}{tail}")).unwrap_err().field,
                field,
                "{tail}"
            );
        }
        let no_ip =
            parse_service("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n");
        assert_eq!(no_ip.unwrap_err().field, "spec.clusterIP");
        let headless =
            parse_service("apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None}\n").unwrap();
        assert_eq!(headless.skip, Some(Skip::Headless));
    }

    /// kube-proxy programs what it can of a service: a bad value is
    /// skipped (and logged), not the whole service.
    #[test]
    fn one_bad_value_skips_that_value_not_the_service() {
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: net-test}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n";
        /// A spec/status tail and what the service keeps of it.
        struct Case {
            tail: &'static str,
            ranges: &'static [&'static str],
            lb_ips: &'static [&'static str],
            external_ips: &'static [&'static str],
            ignored: &'static [&'static str],
        }
        const NONE: &[&str] = &[];
        let case = |tail| Case {
            tail,
            ranges: NONE,
            lb_ips: NONE,
            external_ips: NONE,
            ignored: NONE,
        };
        let cases = [
            Case {
                ranges: &["198.18.0.0/24", "fd00::/8"],
                ..case("  loadBalancerSourceRanges: [' 198.18.0.0/24 ', \"fd00::/8\\t\"]\n")
            },
            Case {
                ranges: &["198.18.0.0/24"],
                ignored: &[
                    "spec.loadBalancerSourceRanges[1]",
                    "spec.loadBalancerSourceRanges[2]",
                    "spec.loadBalancerSourceRanges[4]",
                ],
                ..case("  loadBalancerSourceRanges: [198.18.0.0/24, bogus, 198.18.1.1, '', 198.18.0.0/33]\n")
            },
            Case {
                external_ips: &["198.19.101.1"],
                ignored: &["spec.externalIPs[1]"],
                ..case("  externalIPs: [198.19.101.1, not-an-ip]\n")
            },
            Case {
                lb_ips: &["198.19.100.1", "198.19.100.2"],
                ..case("status: {loadBalancer: {ingress: [{ip: 198.19.100.1}, {ip: 198.19.100.2, ipMode: VIP}]}}\n")
            },
            // kube-proxy's IsVIPMode: Proxy (or an unknown mode) is not captured.
            case(
                "status: {loadBalancer: {ingress: [{ip: 198.19.100.1, ipMode: Proxy}, {ip: 198.19.100.2, ipMode: Future}]}}\n",
            ),
            Case {
                lb_ips: &["198.19.100.3"],
                ignored: &["status.loadBalancer.ingress[1].ip"],
                ..case(
                    "status: {loadBalancer: {ingress: [{hostname: lb.example}, {ip: 198.19.100.300}, {ip: 198.19.100.3}]}}\n",
                )
            },
            case(""),
        ];
        fn strings<T: ToString>(v: &[T]) -> Vec<String> {
            v.iter().map(T::to_string).collect()
        }
        for c in cases {
            let tail = c.tail;
            let spec = parse_service(&format!("{base}{tail}")).unwrap_or_else(|e| panic!("{tail}: {e}"));
            assert_eq!(strings(&spec.source_ranges), c.ranges, "{tail}");
            assert_eq!(strings(&spec.load_balancer_ips), c.lb_ips, "{tail}");
            assert_eq!(strings(&spec.external_ips), c.external_ips, "{tail}");
            let ignored: Vec<&str> = spec.ignored.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(ignored, c.ignored, "{tail}");
        }
    }

    #[test]
    fn source_ranges_guard_only_load_balancer_ips_of_their_family() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: net-test}\nspec:\n  type: LoadBalancer\n  clusterIPs: [198.19.0.10, 'fd00:198:19::10']\n  loadBalancerSourceRanges: ['fd00:198:18::/64']\n  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 198.19.100.1}, {ip: 'fd00:198:19:100::1'}]}}\n";
        let (model, _) = Model::build(
            &Snapshot {
                services: vec![parse_service(yaml).unwrap()],
                ..Default::default()
            },
            &NodeContext::default(),
        );
        let lb = |ip: &str| &model.services[&Frontend::new(ip.parse().unwrap(), 80, Protocol::Tcp)];
        let v4 = lb("198.19.100.1");
        assert_eq!(
            v4.flags & svc_flags::SOURCE_RANGES,
            0,
            "IPv6 ranges leave the IPv4 LB IP open"
        );
        assert!(v4.source_ranges.is_empty());
        let v6 = lb("fd00:198:19:100::1");
        assert_eq!(v6.flags & svc_flags::SOURCE_RANGES, svc_flags::SOURCE_RANGES);
        assert_eq!(v6.source_ranges, ["fd00:198:18::/64".parse::<Cidr>().unwrap()]);
    }

    #[test]
    fn slice_ports_without_a_valid_number_are_ignored_not_the_slice() {
        let slice: EndpointSlice = serde_norway::from_str(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: net-test, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http}, {name: dns, port: 0, protocol: UDP}, {name: big, port: 70000}, {name: ok, port: 8080}]\nendpoints:\n- addresses: [198.18.1.1]\n  nodeName: node-1\n",
        )
        .unwrap();
        let spec = SliceSpec::from_k8s(&slice).unwrap().unwrap();
        let ports: Vec<(&str, Option<u16>)> = spec.ports.iter().map(|p| (p.name.as_str(), p.port)).collect();
        assert_eq!(
            ports,
            [("http", None), ("dns", None), ("big", None), ("ok", Some(8080))]
        );
        let ignored: Vec<&str> = spec.ignored.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(ignored, ["ports[0].port", "ports[1].port", "ports[2].port"]);
        let service = svc(vec![
            port("http", 80, Protocol::Tcp, TargetPort::Number(8080)),
            port("ok", 81, Protocol::Tcp, TargetPort::Number(8080)),
        ]);
        let (model, _) = Model::build(
            &Snapshot {
                services: vec![service],
                slices: vec![spec],
                nodes: vec![],
            },
            &NodeContext::default(),
        );
        let endpoints = |port| {
            model.services[&Frontend::new(VIP.parse().unwrap(), port, Protocol::Tcp)]
                .endpoints
                .len()
        };
        assert_eq!((endpoints(80), endpoints(81)), (0, 1));
    }

    #[test]
    fn slice_conditions_default_like_kube_proxy() {
        let slice: EndpointSlice = serde_norway::from_str(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- addresses: [198.18.1.1]\n- addresses: [198.18.1.2]\n  conditions: {ready: false, terminating: true}\n  hints: {forZones: [{name: zone-a}]}\n",
        )
        .unwrap();
        let spec = SliceSpec::from_k8s(&slice).unwrap().unwrap();
        let e = &spec.endpoints;
        assert_eq!((e[0].ready, e[0].serving, e[0].terminating), (true, true, false));
        assert_eq!((e[1].ready, e[1].serving, e[1].terminating), (false, true, true));
        assert_eq!(e[1].zone_hints, ["zone-a"]);
        assert_eq!((spec.ipv6, spec.trigger_time), (false, None));
    }

    #[test]
    fn slice_trigger_time_is_read_and_a_bad_one_left_out() {
        let read = |annotation: &str| {
            let yaml = format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, labels: {{kubernetes.io/service-name: web}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{annotation}'}}}}\naddressType: IPv6\nendpoints: []\n"
            );
            let slice: EndpointSlice = serde_norway::from_str(&yaml).unwrap();
            SliceSpec::from_k8s(&slice).unwrap().unwrap()
        };
        let spec = read("2026-12-07T05:00:01.5Z");
        let want = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_796_619_601_500);
        assert_eq!((spec.ipv6, spec.trigger_time), (true, Some(want)));
        assert_eq!(read("yesterday").trigger_time, None);
    }
}
