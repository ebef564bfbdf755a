//! Kubernetes YAML for the sandbox: the seed's example (namespace net-test,
//! nginx ×3, Service 8080 → 80) plus a UDP service, rendered from a small
//! description so tests can change endpoints and services.

use std::fmt::Write;
use std::net::Ipv4Addr;

use crate::sandbox::NODE_NAME;

#[derive(Clone, Debug)]
pub struct PortDef {
    pub name: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
}

#[derive(Clone, Debug)]
pub struct ServiceDef {
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<PortDef>,
    /// (pod name, pod IP) of the ready endpoints.
    pub endpoints: Vec<(String, Ipv4Addr)>,
}

pub const NAMESPACE: &str = "net-test";
pub const NGINX_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
pub const UDP_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);

/// `nginx-service` (TCP 8080 → 80) on the given pods.
pub fn nginx_service(endpoints: &[(String, Ipv4Addr)]) -> ServiceDef {
    ServiceDef {
        name: "nginx-service",
        cluster_ip: NGINX_VIP,
        ports: vec![PortDef {
            name: "",
            protocol: "TCP",
            port: 8080,
            target_port: 80,
        }],
        endpoints: endpoints.to_vec(),
    }
}

/// `udp-echo` (UDP 53 → 5353) on the given pods.
pub fn udp_service(endpoints: &[(String, Ipv4Addr)]) -> ServiceDef {
    ServiceDef {
        name: "udp-echo",
        cluster_ip: UDP_VIP,
        ports: vec![PortDef {
            name: "dns",
            protocol: "UDP",
            port: 53,
            target_port: 5353,
        }],
        endpoints: endpoints.to_vec(),
    }
}

/// The seed's NodePort example: `nginx-service-nodeport`, 8080 → 80, on
/// every node address at NODE_PORT.
pub fn nodeport_service(endpoints: &[(String, Ipv4Addr)]) -> ServiceDef {
    ServiceDef {
        name: "nginx-service-nodeport",
        cluster_ip: Ipv4Addr::new(198, 19, 0, 12),
        ..nginx_service(endpoints)
    }
}

/// The NodePort of the seed's example (its output showed 30559).
pub const NODE_PORT: u16 = 30559;

/// The three nginx pods of the example.
pub fn example_pods() -> Vec<(String, Ipv4Addr)> {
    (0..3)
        .map(|i| {
            (
                format!("nginx-{}", (b'a' + i) as char),
                Ipv4Addr::new(198, 18, 1, 11 + i),
            )
        })
        .collect()
}

/// Namespace + Deployment (as the seed has them; the proxy ignores both).
pub fn namespace_and_deployment() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
  namespace: {NAMESPACE}
  labels:
    app: nginx
spec:
  replicas: 3
  selector:
    matchLabels:
      app: nginx-net
  template:
    metadata:
      labels:
        app: nginx-net
    spec:
      containers:
      - name: nginx
        image: nginx
        ports:
        - containerPort: 80
"#
    )
}

/// The node object for this sandbox's node.
pub fn node(ip: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: {NODE_NAME}
status:
  addresses:
  - type: InternalIP
    address: {ip}
"#
    )
}

/// A ClusterIP Service and the EndpointSlice the endpoint controller would
/// make for it.
pub fn service(def: &ServiceDef) -> String {
    typed_service(def, "ClusterIP", None)
}

/// A Service of `service_type`; `node_port` for the (first) port of a
/// NodePort service.
pub fn typed_service(def: &ServiceDef, service_type: &str, node_port: Option<u16>) -> String {
    let mut y = String::new();
    let name = def.name;
    let _ = write!(
        y,
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  type: {service_type}
  clusterIP: {ip}
  selector:
    app: nginx-net
  ports:
"#,
        ip = def.cluster_ip
    );
    for p in &def.ports {
        let _ = write!(
            y,
            "  - protocol: {}\n    port: {}\n    targetPort: {}\n",
            p.protocol, p.port, p.target_port
        );
        if !p.name.is_empty() {
            let _ = writeln!(y, "    name: {}", p.name);
        }
        if let Some(np) = node_port {
            let _ = writeln!(y, "    nodePort: {np}");
        }
    }
    let _ = write!(
        y,
        r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-x7k2p
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
"#
    );
    for p in &def.ports {
        let _ = writeln!(
            y,
            "- name: \"{}\"\n  protocol: {}\n  port: {}",
            p.name, p.protocol, p.target_port
        );
    }
    if def.endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
    }
    for (pod, ip) in &def.endpoints {
        let _ = write!(
            y,
            r#"- addresses: ["{ip}"]
  conditions:
    ready: true
  nodeName: {NODE_NAME}
  targetRef:
    kind: Pod
    namespace: {NAMESPACE}
    name: {pod}
"#
        );
    }
    y
}

/// Several documents as one multi-document YAML file.
pub fn join(docs: &[String]) -> String {
    docs.iter()
        .map(|d| d.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n"
}

/// deploy/examples/net-test.yaml: what the demo runs.
pub fn example() -> String {
    let pods = example_pods();
    let header = "# The seed's example (namespace net-test, nginx x3, Service 8080 -> 80, and its\n\
                  # NodePort variant) plus a UDP service, as the API server would hold them:\n\
                  # cluster IPs and node ports allocated, EndpointSlices filled in.\n\
                  # Generated by lb-tests::manifests::example().\n";
    format!(
        "{header}{}",
        join(&[
            namespace_and_deployment(),
            node(crate::sandbox::NODE_GATEWAY),
            service(&nginx_service(&pods)),
            typed_service(&nodeport_service(&pods), "NodePort", Some(NODE_PORT)),
            service(&udp_service(&pods))
        ])
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn shipped_example_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/net-test.yaml");
        let shipped = std::fs::read_to_string(path).unwrap_or_default();
        if std::env::var_os("UPDATE_EXAMPLES").is_some() {
            std::fs::write(path, super::example()).unwrap();
            return;
        }
        assert_eq!(
            shipped,
            super::example(),
            "run with UPDATE_EXAMPLES=1 to regenerate {path}"
        );
    }
}
