//! kube-proxy's service health check server: for each service with
//! externalTrafficPolicy Local, `healthCheckNodePort` answers 200 when this
//! node has local endpoints and 503 when it has none, so cloud load
//! balancers only send to nodes that can serve locally.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::model::HealthCheck;

#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, (watch::Sender<HealthCheck>, JoinHandle<()>)>,
}

async fn answer(State(state): State<watch::Receiver<HealthCheck>>) -> impl IntoResponse {
    let hc = state.borrow().clone();
    let status = if hc.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // The body kube-proxy's healthcheck server sends.
    let body = serde_json::json!({
        "service": {"namespace": hc.namespace, "name": hc.name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": true,
    });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string())
}

impl HealthServers {
    /// Serves exactly `wanted`: starts new ports, updates counts, stops
    /// ports no longer wanted.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health check server stopped");
            }
            keep
        });
        for (&port, hc) in wanted {
            if let Some((state, _)) = self.servers.get(&port) {
                state.send_if_modified(|old| {
                    let changed = old != hc;
                    *old = hc.clone();
                    changed
                });
                continue;
            }
            let listener = match std::net::TcpListener::bind(("0.0.0.0", port)).and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    error!(port, service = %format!("{}/{}", hc.namespace, hc.name), "health check port: {e}");
                    continue;
                }
            };
            let (state, rx) = watch::channel(hc.clone());
            let app = Router::new().fallback(answer).with_state(rx);
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "health check server started");
            self.servers.insert(port, (state, task));
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.servers) {
            task.abort();
        }
    }
}
