//! The model: Services + EndpointSlices → one entry per service port
//! (VIP, port, protocol) with the endpoints kube-proxy would use for it.
//!
//! `ServiceSpec`/`SliceSpec` are the normalized, validated forms of the
//! Kubernetes objects (API defaults applied); every source produces them, so
//! the manifests source and the Kubernetes source share the semantics here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

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
}

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
            ports.push(ServicePortSpec {
                name,
                port,
                protocol,
                target_port,
            });
        }
        if ports.is_empty() && skip.is_none() {
            return Err(field_err("spec.ports", "a service needs at least one port"));
        }
        Ok(ServiceSpec {
            namespace,
            name,
            cluster_ips,
            ports,
            skip,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    /// None: the slice does not restrict the port; the service's numeric
    /// targetPort is used.
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub namespace: String,
    pub name: String,
    pub service_name: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointSpec>,
}

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
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("ports[{i}].{f}");
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port: p.port.map(|n| port_number(&field("port"), n)).transpose()?,
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
            // API semantics: unset `ready` means ready; unset `serving`
            // follows `ready`; unset `terminating` means not terminating.
            let cond = e.conditions.clone().unwrap_or_default();
            let ready = cond.ready.unwrap_or(true);
            endpoints.push(EndpointSpec {
                address,
                ready,
                serving: cond.serving.unwrap_or(ready),
                terminating: cond.terminating.unwrap_or(false),
                node_name: e.node_name.clone(),
            });
        }
        Ok(Some(SliceSpec {
            namespace,
            name,
            service_name,
            ports,
            endpoints,
        }))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

impl NodeSpec {
    pub fn from_k8s(node: &Node) -> Result<Self, FieldError> {
        let name = node
            .metadata
            .name
            .clone()
            .ok_or_else(|| field_err("metadata.name", "missing"))?;
        let mut addresses = Vec::new();
        for (i, a) in node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .enumerate()
        {
            if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
                addresses.push(parse_ip(&format!("status.addresses[{i}].address"), &a.address)?);
            }
        }
        Ok(NodeSpec { name, addresses })
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
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
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
}

impl Model {
    /// Builds the model with kube-proxy's endpoint rules: slices merged and
    /// de-duplicated, slice ports matched to service ports by name and
    /// protocol, ready endpoints used, and serving+terminating ones only when
    /// no endpoint is ready (KEP-1669).
    pub fn build(snapshot: &Snapshot) -> (Model, Vec<ModelWarning>) {
        let mut model = Model::default();
        let mut warnings = Vec::new();
        for svc in &snapshot.services {
            if svc.skip.is_some() {
                continue;
            }
            let slices: Vec<&SliceSpec> = snapshot
                .slices
                .iter()
                .filter(|s| s.namespace == svc.namespace && s.service_name == svc.name)
                .collect();
            for sp in &svc.ports {
                let name = format!("{}/{}:{}", svc.namespace, svc.name, sp.name);
                if sp.protocol == Protocol::Sctp {
                    warnings.push(ModelWarning(format!(
                        "{name}: SCTP is not supported by the datapath yet; port skipped"
                    )));
                    continue;
                }
                for &ip in &svc.cluster_ips {
                    if ip.is_ipv6() {
                        warnings.push(ModelWarning(format!(
                            "{name}: IPv6 cluster IP {ip} is not supported yet; skipped"
                        )));
                        continue;
                    }
                    let frontend = Frontend {
                        ip,
                        port: sp.port,
                        protocol: sp.protocol,
                    };
                    let endpoints = endpoints_for(sp, ip.is_ipv4(), &slices);
                    if let Some(existing) = model.services.get(&frontend) {
                        warnings.push(ModelWarning(format!(
                            "{name}: frontend {frontend} is already used by {}; ignored",
                            existing.name
                        )));
                        continue;
                    }
                    model.services.insert(
                        frontend,
                        ServicePort {
                            name: name.clone(),
                            frontend,
                            endpoints,
                        },
                    );
                }
            }
        }
        (model, warnings)
    }
}

fn endpoints_for(sp: &ServicePortSpec, want_v4: bool, slices: &[&SliceSpec]) -> BTreeSet<Endpoint> {
    let mut ready = BTreeSet::new();
    let mut fallback = BTreeSet::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
        else {
            continue;
        };
        let port = match (slice_port.port, &sp.target_port) {
            (Some(p), _) => p,
            (None, TargetPort::Number(p)) => *p,
            (None, TargetPort::Name(_)) => continue, // unresolvable without the pod spec
        };
        for e in &slice.endpoints {
            if e.address.is_ipv4() != want_v4 {
                continue;
            }
            let ep = Endpoint { ip: e.address, port };
            if e.ready {
                ready.insert(ep);
            } else if e.serving && e.terminating {
                fallback.insert(ep);
            }
        }
    }
    if ready.is_empty() { fallback } else { ready }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str, ports: Vec<ServicePortSpec>) -> ServiceSpec {
        ServiceSpec {
            namespace: "net-test".into(),
            name: name.into(),
            cluster_ips: vec![ip.parse().unwrap()],
            ports,
            skip: None,
        }
    }

    fn port(name: &str, port: u16, protocol: Protocol, target: u16) -> ServicePortSpec {
        ServicePortSpec {
            name: name.into(),
            port,
            protocol,
            target_port: TargetPort::Number(target),
        }
    }

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool) -> EndpointSpec {
        EndpointSpec {
            address: ip.parse().unwrap(),
            ready,
            serving,
            terminating,
            node_name: None,
        }
    }

    fn slice(name: &str, svc: &str, ports: Vec<SlicePort>, endpoints: Vec<EndpointSpec>) -> SliceSpec {
        SliceSpec {
            namespace: "net-test".into(),
            name: name.into(),
            service_name: svc.into(),
            ports,
            endpoints,
        }
    }

    fn sport(name: &str, port: Option<u16>, protocol: Protocol) -> SlicePort {
        SlicePort {
            name: name.into(),
            port,
            protocol,
        }
    }

    fn endpoints(model: &Model, fe: &str, port: u16, protocol: Protocol) -> Vec<String> {
        let f = Frontend {
            ip: fe.parse().unwrap(),
            port,
            protocol,
        };
        model.services[&f].endpoints.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn merges_slices_dedups_and_matches_ports_by_name() {
        let snap = Snapshot {
            services: vec![svc(
                "web",
                "198.19.0.10",
                vec![
                    port("http", 8080, Protocol::Tcp, 80),
                    port("dns", 53, Protocol::Udp, 5353),
                ],
            )],
            slices: vec![
                slice(
                    "web-a",
                    "web",
                    vec![
                        sport("http", Some(80), Protocol::Tcp),
                        sport("dns", Some(5353), Protocol::Udp),
                    ],
                    vec![
                        ep("198.18.1.11", true, true, false),
                        ep("198.18.1.12", true, true, false),
                    ],
                ),
                slice(
                    "web-b",
                    "web",
                    vec![sport("http", Some(80), Protocol::Tcp)],
                    vec![
                        ep("198.18.1.12", true, true, false),
                        ep("198.18.1.13", true, true, false),
                    ],
                ),
                slice(
                    "other",
                    "other",
                    vec![sport("http", Some(81), Protocol::Tcp)],
                    vec![ep("198.18.9.9", true, true, false)],
                ),
            ],
            nodes: vec![],
        };
        let (model, warnings) = Model::build(&snap);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            endpoints(&model, "198.19.0.10", 8080, Protocol::Tcp),
            ["198.18.1.11:80", "198.18.1.12:80", "198.18.1.13:80"]
        );
        assert_eq!(
            endpoints(&model, "198.19.0.10", 53, Protocol::Udp),
            ["198.18.1.11:5353", "198.18.1.12:5353"]
        );
    }

    #[test]
    fn not_ready_endpoints_are_left_out_and_terminating_serve_only_as_fallback() {
        let mk = |eps| Snapshot {
            services: vec![svc("web", "198.19.0.10", vec![port("", 80, Protocol::Tcp, 80)])],
            slices: vec![slice("s", "web", vec![sport("", None, Protocol::Tcp)], eps)],
            nodes: vec![],
        };
        let (m, _) = Model::build(&mk(vec![
            ep("198.18.1.11", true, true, false),
            ep("198.18.1.12", false, false, false),
            ep("198.18.1.13", false, true, true),
        ]));
        assert_eq!(endpoints(&m, "198.19.0.10", 80, Protocol::Tcp), ["198.18.1.11:80"]);
        let (m, _) = Model::build(&mk(vec![
            ep("198.18.1.12", false, false, false),
            ep("198.18.1.13", false, true, true),
        ]));
        assert_eq!(endpoints(&m, "198.19.0.10", 80, Protocol::Tcp), ["198.18.1.13:80"]);
    }

    #[test]
    fn skipped_and_unsupported_services_produce_no_frontend() {
        let mut headless = svc("h", "198.19.0.1", vec![port("", 80, Protocol::Tcp, 80)]);
        headless.skip = Some(Skip::Headless);
        let sctp = svc("s", "198.19.0.2", vec![port("", 80, Protocol::Sctp, 80)]);
        let (m, w) = Model::build(&Snapshot {
            services: vec![headless, sctp],
            ..Default::default()
        });
        assert!(m.services.is_empty());
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn service_defaults_and_field_errors() {
        let parsed: Service = serde_norway::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: net-test}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 8080}]\n",
        )
        .unwrap();
        let spec = ServiceSpec::from_k8s(&parsed).unwrap();
        assert_eq!(spec.ports, vec![port("", 8080, Protocol::Tcp, 8080)]);

        let bad: Service = serde_norway::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 8080, protocol: XTP}]\n",
        )
        .unwrap();
        let err = ServiceSpec::from_k8s(&bad).unwrap_err();
        assert_eq!(err.field, "spec.ports[0].protocol");

        let no_ip: Service = serde_norway::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n",
        )
        .unwrap();
        assert_eq!(ServiceSpec::from_k8s(&no_ip).unwrap_err().field, "spec.clusterIP");
    }
}
