//! kube-proxy's health servers (pkg/proxy/healthcheck), same answers:
//!
//! - `/healthz` and `/livez` on `--healthz-bind-address` (default
//!   0.0.0.0:10256, which like Go's listener takes IPv4 and IPv6): the
//!   proxy is healthy unless a change has waited longer than twice the
//!   sync period for a successful sync (so it is healthy while starting).
//!   `/healthz` is also 503 while this node's Node object is being deleted
//!   or carries the cluster autoscaler's ToBeDeletedByClusterAutoscaler
//!   taint, so load balancers drain the node; `/livez` ignores the node.
//! - one server per `healthCheckNodePort` (LoadBalancer services with
//!   externalTrafficPolicy Local): 200 while this node has ready endpoints
//!   of the service and the proxy is healthy, else 503, so cloud load
//!   balancers only send to nodes that can serve locally. It listens on
//!   every address (both families), or only on the node addresses in
//!   `--nodeport-addresses` when given.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::metrics::SharedStatus;
use crate::model::{FamilyFlags, HealthCheck};

/// The proxy's own health at `now` (kube-proxy's ProxyHealthServer.Health):
/// unhealthy once a change has waited longer than `timeout` for a sync.
pub fn proxy_healthy(pending_since: Option<Instant>, now: Instant, timeout: Duration) -> bool {
    pending_since.is_none_or(|t| now.saturating_duration_since(t) < timeout)
}

/// Go's JSON form of a time.Time (RFC 3339, UTC); the zero time when unset.
fn go_time(t: Option<SystemTime>) -> String {
    t.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map_or_else(|| "0001-01-01T00:00:00Z".to_string(), |t| t.to_string())
}

/// What `/healthz` and `/livez` report, read from the agent's status.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyHealth {
    pub healthy: bool,
    /// The last successful sync.
    pub last_updated: Option<SystemTime>,
    pub now: SystemTime,
    /// The families the proxy serves (kube-proxy reports one proxier each).
    pub families: FamilyFlags,
}

impl ProxyHealth {
    pub fn read(status: &SharedStatus, timeout: Duration) -> (Self, bool) {
        let st = status.lock().unwrap_or_else(|e| e.into_inner());
        let health = ProxyHealth {
            healthy: proxy_healthy(st.pending_since, Instant::now(), timeout),
            last_updated: st.last_sync,
            now: SystemTime::now(),
            families: st.families,
        };
        (health, st.node_eligible)
    }

    /// kube-proxy's response: 503 when unhealthy (or, for `/healthz`, the
    /// node is not eligible); a healthy answer shows the current time as
    /// lastUpdated, as kube-proxy does for compatibility.
    pub fn response(&self, node_eligible: Option<bool>) -> (StatusCode, String) {
        let ok = self.healthy && node_eligible.unwrap_or(true);
        let shown = if ok { Some(self.now) } else { self.last_updated };
        let mut body = serde_json::json!({
            "lastUpdated": go_time(shown),
            "currentTime": go_time(Some(self.now)),
        });
        if let Some(eligible) = node_eligible {
            body["nodeEligible"] = eligible.into();
        }
        body["healthy"] = self.healthy.into();
        if self.last_updated.is_some() {
            let proxier = serde_json::json!({"lastUpdated": go_time(self.last_updated), "healthy": self.healthy});
            let mut status = serde_json::Map::new();
            for (family, on) in [("IPv4", self.families.v4), ("IPv6", self.families.v6)] {
                if on {
                    status.insert(family.into(), proxier.clone());
                }
            }
            if !status.is_empty() {
                body["status"] = status.into();
            }
        }
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body.to_string())
    }
}

const NOSNIFF: (HeaderName, HeaderValue) = (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
const JSON: (HeaderName, HeaderValue) = (header::CONTENT_TYPE, HeaderValue::from_static("application/json"));

/// A TCP listener on `addr`. An unspecified address (0.0.0.0 or ::) takes
/// both families on one IPv6 socket with IPV6_V6ONLY off, as Go's listener
/// does for kube-proxy (IPv4 alone where the kernel has no IPv6).
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |addr: SocketAddr, dual: bool| -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if dual {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    };
    let socket = if addr.ip().is_unspecified() {
        match open(SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())), true) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                open(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())), false)?
            }
            other => other?,
        }
    } else {
        open(addr, false)?
    };
    tokio::net::TcpListener::from_std(socket.into())
}

/// Serves `/healthz` and `/livez` on `listener` (bound at start-up, so a
/// taken port fails start-up); `timeout`: how long a change may wait for a
/// sync (kube-proxy: twice the sync period).
pub async fn serve_proxy_health(
    listener: tokio::net::TcpListener,
    status: SharedStatus,
    timeout: Duration,
) -> anyhow::Result<()> {
    let answer = |with_node: bool| {
        move |State(status): State<SharedStatus>| async move {
            let (health, eligible) = ProxyHealth::read(&status, timeout);
            let (code, body) = health.response(with_node.then_some(eligible));
            {
                let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
                let answers = if with_node {
                    &mut st.healthz_answers
                } else {
                    &mut st.livez_answers
                };
                *answers.entry(code.as_u16()).or_default() += 1;
            }
            (code, [JSON, NOSNIFF], body).into_response()
        }
    };
    let app = Router::new()
        .route("/healthz", get(answer(true)))
        .route("/livez", get(answer(false)))
        .with_state(status);
    info!(addr = %listener.local_addr()?, "health server listening");
    axum::serve(listener, app).await?;
    Ok(())
}

/// kube-proxy's answer on a healthCheckNodePort.
pub fn service_response(hc: &HealthCheck, proxy_healthy: bool) -> Response {
    let code = if hc.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    // kube-proxy's exact layout (tab-indented).
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        quote(&hc.namespace),
        quote(&hc.name),
        hc.local_endpoints,
        proxy_healthy
    );
    let weight = (
        HeaderName::from_static("x-load-balancing-endpoint-weight"),
        HeaderValue::from(hc.local_endpoints),
    );
    (code, [JSON, NOSNIFF, weight], body).into_response()
}

#[derive(Clone)]
struct ServiceHealthState {
    check: watch::Receiver<HealthCheck>,
    status: SharedStatus,
    timeout: Duration,
}

async fn answer_service(State(state): State<ServiceHealthState>) -> Response {
    let hc = state.check.borrow().clone();
    let (health, _) = ProxyHealth::read(&state.status, state.timeout);
    service_response(&hc, health.healthy)
}

struct ServiceServer {
    check: watch::Sender<HealthCheck>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ServiceServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The healthCheckNodePort servers.
pub struct HealthServers {
    status: SharedStatus,
    timeout: Duration,
    /// Where they listen: every address (empty), or these node addresses.
    bind: Vec<IpAddr>,
    servers: BTreeMap<u16, ServiceServer>,
}

impl HealthServers {
    pub fn new(status: SharedStatus, timeout: Duration) -> Self {
        HealthServers {
            status,
            timeout,
            bind: Vec::new(),
            servers: BTreeMap::new(),
        }
    }

    /// Serves exactly `wanted` on `bind` (empty: every address): starts
    /// new ports, updates counts, stops ports no longer wanted. A port that
    /// cannot be opened is retried on the next update.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>, bind: &[IpAddr]) {
        if self.bind != bind {
            // The addresses changed (--nodeport-addresses matched others).
            self.servers.clear();
            self.bind = bind.to_vec();
        }
        self.servers.retain(|port, _| {
            let keep = wanted.contains_key(port);
            if !keep {
                info!(port, "health check server stopped");
            }
            keep
        });
        for (&port, hc) in wanted {
            if let Some(server) = self.servers.get(&port) {
                server.check.send_if_modified(|old| {
                    let changed = old != hc;
                    *old = hc.clone();
                    changed
                });
                continue;
            }
            let service = format!("{}/{}", hc.namespace, hc.name);
            let addrs: Vec<SocketAddr> = if self.bind.is_empty() {
                vec![SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))]
            } else {
                self.bind.iter().map(|&ip| SocketAddr::new(ip, port)).collect()
            };
            let listeners = match addrs.iter().map(|&a| listen(a)).collect::<std::io::Result<Vec<_>>>() {
                Ok(l) => l,
                Err(e) => {
                    let e = anyhow::Error::new(e).context(format!(
                        "health check port {port} of {service} (healthCheckNodePort): cannot listen; retried on the next sync"
                    ));
                    crate::metrics::count_error(&self.status, crate::metrics::operation::HEALTH_CHECK_PORT, &e);
                    continue;
                }
            };
            let (check, rx) = watch::channel(hc.clone());
            let app = Router::new().fallback(answer_service).with_state(ServiceHealthState {
                check: rx,
                status: self.status.clone(),
                timeout: self.timeout,
            });
            let tasks = listeners
                .into_iter()
                .map(|listener| {
                    let app = app.clone();
                    tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    })
                })
                .collect();
            info!(port, %service, addresses = ?addrs, "health check server started");
            self.servers.insert(port, ServiceServer { check, tasks });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_is_healthy_until_a_change_waits_too_long() {
        let now = Instant::now();
        let timeout = Duration::from_secs(60);
        assert!(proxy_healthy(None, now, timeout), "nothing pending (also at startup)");
        assert!(proxy_healthy(Some(now - Duration::from_secs(59)), now, timeout));
        assert!(!proxy_healthy(Some(now - Duration::from_secs(60)), now, timeout));
    }

    fn body(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn healthz_and_livez_answer_like_kube_proxy() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let now = t0 + Duration::from_secs(5);
        let health = ProxyHealth {
            healthy: true,
            last_updated: Some(t0),
            now,
            families: FamilyFlags { v4: true, v6: true },
        };
        // (health, node eligibility for /healthz or None for /livez) → code, nodeEligible
        let cases = [
            (health.clone(), Some(true), StatusCode::OK),
            (health.clone(), Some(false), StatusCode::SERVICE_UNAVAILABLE),
            (health.clone(), None, StatusCode::OK),
            (
                ProxyHealth {
                    healthy: false,
                    ..health.clone()
                },
                None,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (h, eligible, want) in cases {
            let (code, text) = h.response(eligible);
            assert_eq!(code, want, "{h:?} {eligible:?}");
            let b = body(&text);
            assert_eq!(b["currentTime"], "2023-11-14T22:13:25Z");
            assert_eq!(b["healthy"], h.healthy);
            assert_eq!(b.get("nodeEligible").and_then(|v| v.as_bool()), eligible);
            // Healthy: lastUpdated is "now" (kube-proxy's compatibility rule).
            let last = if code == StatusCode::OK {
                "2023-11-14T22:13:25Z"
            } else {
                "2023-11-14T22:13:20Z"
            };
            assert_eq!(b["lastUpdated"], last, "{text}");
            assert_eq!(b["status"]["IPv4"]["lastUpdated"], "2023-11-14T22:13:20Z");
            assert_eq!(b["status"]["IPv6"]["healthy"], h.healthy);
        }
        let starting = ProxyHealth {
            healthy: true,
            last_updated: None,
            now,
            families: FamilyFlags { v4: true, v6: false },
        };
        let (code, text) = starting.response(Some(true));
        assert_eq!(code, StatusCode::OK, "healthy while starting");
        assert!(body(&text).get("status").is_none(), "{text}");
    }

    #[tokio::test]
    async fn service_health_check_answers_like_kube_proxy() {
        let hc = |n| HealthCheck {
            namespace: "net-test".into(),
            name: "web".into(),
            local_endpoints: n,
        };
        for (count, proxy_ok, want) in [
            (2, true, StatusCode::OK),
            (0, true, StatusCode::SERVICE_UNAVAILABLE),
            (2, false, StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let response = service_response(&hc(count), proxy_ok);
            assert_eq!(response.status(), want);
            let headers = response.headers();
            assert_eq!(headers["content-type"], "application/json");
            assert_eq!(headers["x-content-type-options"], "nosniff");
            assert_eq!(headers["x-load-balancing-endpoint-weight"], count.to_string().as_str());
            let bytes = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            assert_eq!(
                text,
                format!(
                    "{{\n\t\"service\": {{\n\t\t\"namespace\": \"net-test\",\n\t\t\"name\": \"web\"\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {proxy_ok}\n}}"
                )
            );
        }
    }
}
