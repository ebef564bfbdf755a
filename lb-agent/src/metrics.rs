//! Prometheus `/metrics` like kube-proxy's (`--metrics-bind-address`,
//! default 127.0.0.1:10249); `/healthz` and `/livez` are in `health`.
//! Kernel counters are read from the pinned maps at scrape time; the
//! agent's own numbers come from `AgentStatus`, which the sync loop updates.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{error, info};

use crate::datapath::BpfMaps;
use crate::model::FamilyFlags;

/// What the sync loop reports.
pub struct AgentStatus {
    pub last_sync: Option<SystemTime>,
    /// When a change arrived that is not programmed yet.
    pub pending_since: Option<Instant>,
    /// This node may take load-balancer traffic (`NodeSpec::eligible`).
    pub node_eligible: bool,
    /// The families of the node's addresses (the proxy serves those).
    pub families: FamilyFlags,
    pub sync_seconds: Histogram,
    pub service_ports: usize,
    /// Service id → (service port name, frontend).
    pub services: BTreeMap<u32, (String, String)>,
    /// Backend id → (service port name, endpoint).
    pub backends: BTreeMap<u32, (String, String)>,
    /// Answers of /healthz and of /livez by status code (kube-proxy's
    /// proxy_healthz_total / proxy_livez_total).
    pub healthz_answers: BTreeMap<u16, u64>,
    pub livez_answers: BTreeMap<u16, u64>,
    /// Recoverable errors the agent logged and carried on after, by
    /// operation (`lbagent_errors_total{operation}`).
    pub errors: BTreeMap<&'static str, u64>,
    /// Interfaces removed before the agent attached to or listed them.
    pub interfaces_vanished: u64,
}

impl Default for AgentStatus {
    fn default() -> Self {
        AgentStatus {
            last_sync: None,
            pending_since: None,
            node_eligible: true,
            families: FamilyFlags::default(),
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            service_ports: 0,
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            healthz_answers: BTreeMap::new(),
            livez_answers: BTreeMap::new(),
            errors: BTreeMap::new(),
            interfaces_vanished: 0,
        }
    }
}

pub type SharedStatus = Arc<Mutex<AgentStatus>>;

/// Operations whose failure the agent logs, counts and survives
/// (`lbagent_errors_total{operation}`); every one is exported, also at 0.
pub mod operation {
    /// Writing the XDP egress device list (an interface gone before the
    /// insert, more interfaces than XDP_EGRESS holds).
    pub const XDP_EGRESS: &str = "xdp_egress";
    /// Attaching or taking over a TC or XDP program on one interface.
    pub const ATTACH: &str = "attach";
    /// Opening a Service's healthCheckNodePort (retried on the next sync).
    pub const HEALTH_CHECK_PORT: &str = "health_check_port";
    /// Reading the node's addresses after an address event.
    pub const LIST_ADDRESSES: &str = "list_addresses";
    /// A sync of the maps (retried as a full resync).
    pub const SYNC: &str = "sync";
    /// The interface event stream ended (re-subscribed and re-listed).
    pub const LINK_EVENTS: &str = "link_events";
    /// A conntrack garbage-collection pass (retried on the next interval).
    pub const CONNTRACK_GC: &str = "conntrack_gc";
    pub const ALL: [&str; 7] = [
        XDP_EGRESS,
        ATTACH,
        HEALTH_CHECK_PORT,
        LIST_ADDRESSES,
        SYNC,
        LINK_EVENTS,
        CONNTRACK_GC,
    ];
}

/// Logs and counts an interface removed before `what` was done on it (pod
/// churn): a race, not an error (`lbagent_interfaces_vanished_total`).
pub fn count_vanished(status: &SharedStatus, interface: &str, what: &str) {
    tracing::info!(interface, "{what}: the interface is gone already (removed meanwhile)");
    lock(status).interfaces_vanished += 1;
}

/// Logs a recoverable error of `operation` and counts it; the agent goes on.
pub fn count_error(status: &SharedStatus, operation: &'static str, error: &anyhow::Error) {
    tracing::error!(operation, "{error:#} (recovered; counted in lbagent_errors_total)");
    *lock(status).errors.entry(operation).or_default() += 1;
}

fn lock(status: &SharedStatus) -> std::sync::MutexGuard<'_, AgentStatus> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

type Labels = Vec<(String, String)>;

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

/// One counter family `name`, one series per `(label value, count)`; a
/// count that could not be read is left out.
fn labelled_counters(
    registry: &mut Registry,
    (name, help, label): (&str, &str, &str),
    counts: impl IntoIterator<Item = (&'static str, anyhow::Result<u64>)>,
) {
    let family = counter_family(registry, name, help);
    for (value, count) in counts {
        if let Ok(n) = count {
            family.get_or_create(&vec![(label.into(), value.into())]).inc_by(n);
        }
    }
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// The text exposition of everything, now.
fn render(status: &SharedStatus, maps: &BpfMaps) -> String {
    let mut registry = Registry::with_prefix("lbagent");
    let st = lock(status);
    registry.register(
        "sync_duration_seconds",
        "Duration of syncs of the datapath maps",
        st.sync_seconds.clone(),
    );
    let last = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    last.set(
        st.last_sync
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    registry.register(
        "last_sync_timestamp_seconds",
        "Unix time of the last successful sync",
        last,
    );
    let programmed = Gauge::<i64>::default();
    programmed.set(st.service_ports as i64);
    registry.register("service_ports", "Service ports (frontends) programmed", programmed);
    let endpoints = Gauge::<i64>::default();
    endpoints.set(st.backends.len() as i64);
    registry.register("backends", "Backends programmed", endpoints);

    for (name, help, answers) in [
        (
            "proxy_healthz",
            "/healthz answers by HTTP status code",
            &st.healthz_answers,
        ),
        ("proxy_livez", "/livez answers by HTTP status code", &st.livez_answers),
    ] {
        let family = counter_family(&mut registry, name, help);
        for (code, n) in answers {
            family
                .get_or_create(&vec![("code".into(), code.to_string())])
                .inc_by(*n);
        }
    }
    let errors = counter_family(
        &mut registry,
        "errors",
        "Recoverable errors the agent logged and carried on after, by operation",
    );
    for op in operation::ALL {
        errors
            .get_or_create(&vec![("operation".into(), op.into())])
            .inc_by(st.errors.get(op).copied().unwrap_or(0));
    }
    let vanished = Counter::<u64>::default();
    vanished.inc_by(st.interfaces_vanished);
    registry.register(
        "interfaces_vanished",
        "Interfaces removed before the agent attached to them or listed them for XDP (pod churn; not an error)",
        vanished,
    );
    labelled_counters(
        &mut registry,
        ("drops", "Packets dropped by the datapath, by reason", "reason"),
        lb_common::DropReason::ALL.map(|r| (r.name(), maps.drops(r))),
    );
    labelled_counters(
        &mut registry,
        ("flow_events", "Datapath events that are not drops, by event", "event"),
        lb_common::FlowEvent::ALL.map(|e| (e.name(), maps.events(e))),
    );
    let svc_packets = counter_family(&mut registry, "service_packets", "Packets balanced, per service port");
    let svc_bytes = counter_family(&mut registry, "service_bytes", "Bytes balanced, per service port");
    for (&id, (name, frontend)) in &st.services {
        if let Ok(c) = maps.service_counter(id) {
            let labels = vec![("service".into(), name.clone()), ("frontend".into(), frontend.clone())];
            svc_packets.get_or_create(&labels).inc_by(c.packets);
            svc_bytes.get_or_create(&labels).inc_by(c.bytes);
        }
    }
    let be_packets = counter_family(&mut registry, "backend_packets", "Packets sent, per backend");
    for (&id, (name, endpoint)) in &st.backends {
        if let Ok(c) = maps.backend_counter(id) {
            let labels = vec![("service".into(), name.clone()), ("endpoint".into(), endpoint.clone())];
            be_packets.get_or_create(&labels).inc_by(c.packets);
        }
    }
    let entries = gauge_family(&mut registry, "map_entries", "Entries in a datapath map");
    let capacity = gauge_family(&mut registry, "map_capacity", "Capacity of a datapath map");
    for (map, count, max) in maps.fill() {
        entries
            .get_or_create(&vec![("map".into(), map.into())])
            .set(count as i64);
        capacity
            .get_or_create(&vec![("map".into(), map.into())])
            .set(max as i64);
    }
    drop(st);
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        error!("encoding metrics: {e}");
    }
    out
}

/// Serves `/metrics` on `listener` (bound at start-up, so a taken port
/// fails start-up), reading `maps` (the pinned ones, opened at start-up).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    status: SharedStatus,
    maps: BpfMaps,
) -> anyhow::Result<()> {
    let maps = Arc::new(Mutex::new(maps));
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let (status, maps) = (status.clone(), maps.clone());
            async move {
                let body = render(&status, &maps.lock().unwrap_or_else(|e| e.into_inner()));
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
            }
        }),
    );
    info!(addr = %listener.local_addr()?, "metrics server listening");
    axum::serve(listener, app).await?;
    Ok(())
}
