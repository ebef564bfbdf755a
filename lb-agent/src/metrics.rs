//! Prometheus `/metrics` like kube-proxy's (`--metrics-bind-address`,
//! default 127.0.0.1:10249); `/healthz` and `/livez` are in `health`.
//! Served in Prometheus' classic text format: kube-proxy's own metrics
//! (`kubeproxy_*`, so its dashboards and alerts work), `process_*`, and
//! ours (`lbagent_*`). Kernel counters are read from the pinned maps at
//! scrape time; the agent's own numbers come from `AgentStatus`, which the
//! sync loop updates.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{error, info};

use lb_common::{BackendId, DropReason, FlowEvent, TrafficCounter};

use crate::datapath::BpfMaps;
use crate::model::FamilyFlags;

/// kube-proxy's buckets for sync durations (pkg/proxy/metrics:
/// `ExponentialBuckets(0.001, 2, 15)`, 1 ms to 16 s).
fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's buckets for network programming latency: 0.25 s, 0.5 s,
/// 1 s … 59 s, 60 s … 115 s, 120 s … 300 s.
fn network_programming_histogram() -> Histogram {
    let linear = |start: f64, width: f64, count: u32| (0..count).map(move |i| start + width * f64::from(i));
    Histogram::new(
        linear(0.25, 0.25, 2)
            .chain(linear(1.0, 1.0, 59))
            .chain(linear(60.0, 5.0, 12))
            .chain(linear(120.0, 30.0, 7)),
    )
}

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// kube-proxy's per-family sync histograms (`ip_family` label): one
/// sync of ours programs both families, so it is observed once for each
/// family the node serves, as kube-proxy's two proxiers would.
#[derive(Clone)]
pub struct SyncHistograms {
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: every sync.
    pub all: HistogramFamily,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`.
    pub full: HistogramFamily,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds`.
    pub partial: HistogramFamily,
    /// `kubeproxy_network_programming_duration_seconds`: from a slice's
    /// last-change-trigger-time to the sync that programmed it.
    pub network_programming: HistogramFamily,
}

impl Default for SyncHistograms {
    fn default() -> Self {
        let family = || HistogramFamily::new_with_constructor(sync_histogram as fn() -> Histogram);
        SyncHistograms {
            all: family(),
            full: family(),
            partial: family(),
            network_programming: HistogramFamily::new_with_constructor(
                network_programming_histogram as fn() -> Histogram,
            ),
        }
    }
}

/// Changes of the source (kube-proxy's
/// `kubeproxy_sync_proxy_rules_{service,endpoint}_changes_{total,pending}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub services_total: u64,
    pub endpoints_total: u64,
    /// Services with a change not programmed yet.
    pub services_pending: usize,
    /// Services whose endpoints have a change not programmed yet.
    pub endpoints_pending: usize,
}

/// What the sync loop reports.
pub struct AgentStatus {
    pub last_sync: Option<SystemTime>,
    /// When a change arrived that is not programmed yet.
    pub pending_since: Option<Instant>,
    /// When the last change was queued for a sync.
    pub last_queued: Option<SystemTime>,
    /// This node may take load-balancer traffic (`NodeSpec::eligible`).
    pub node_eligible: bool,
    /// The families of the node's addresses (the proxy serves those).
    pub families: FamilyFlags,
    pub sync_seconds: Histogram,
    pub syncs: SyncHistograms,
    pub changes: ChangeCounts,
    /// Services with a Local traffic policy and no local endpoint, by
    /// (ip_family, traffic_policy "internal"/"external").
    pub no_local_endpoints: BTreeMap<(&'static str, &'static str), usize>,
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
            last_queued: None,
            node_eligible: true,
            families: FamilyFlags::default(),
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            syncs: SyncHistograms::default(),
            changes: ChangeCounts::default(),
            no_local_endpoints: BTreeMap::new(),
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

impl AgentStatus {
    /// kube-proxy's `ip_family` values of the families the node serves.
    fn ip_families(&self) -> impl Iterator<Item = &'static str> {
        [("IPv4", self.families.v4), ("IPv6", self.families.v6)]
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
    }

    /// A sync (successful or not) took `took`; `full`: a full resync.
    pub fn observe_sync(&mut self, full: bool, took: Duration) {
        let secs = took.as_secs_f64();
        self.sync_seconds.observe(secs);
        let kind = if full { &self.syncs.full } else { &self.syncs.partial };
        for family in self.ip_families() {
            let labels = vec![("ip_family".to_string(), family.to_string())];
            self.syncs.all.get_or_create(&labels).observe(secs);
            kind.get_or_create(&labels).observe(secs);
        }
    }

    /// A slice change that began `latency` ago (its trigger time) is
    /// programmed (kube-proxy's network programming latency).
    pub fn observe_network_programming(&mut self, ipv6: bool, latency: Duration) {
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        self.syncs
            .network_programming
            .get_or_create(&vec![("ip_family".to_string(), family.to_string())])
            .observe(latency.as_secs_f64());
    }

    /// A change arrived: the proxy waits for a sync (kube-proxy's
    /// `QueuedUpdate`); `pending_since` keeps the oldest one.
    pub fn queue_change(&mut self) {
        self.pending_since.get_or_insert_with(Instant::now);
        self.last_queued = Some(SystemTime::now());
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

/// Answers of a health endpoint, one counter per HTTP status (`code`).
fn status_code_counters(registry: &mut Registry, (name, help): (&str, &str), answers: &BTreeMap<u16, u64>) {
    let family = counter_family(registry, name, help);
    for (code, n) in answers {
        family
            .get_or_create(&vec![("code".into(), code.to_string())])
            .inc_by(*n);
    }
}

fn unix_seconds(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn float_gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, FloatGauge> {
    let family = Family::<Labels, FloatGauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let counter = Counter::<u64>::default();
    counter.inc_by(value);
    registry.register(name, help, counter);
}

/// kube-proxy's metrics (pkg/proxy/metrics, the iptables mode's set, names,
/// help texts, labels and buckets as kube-proxy 1.34 registers them).
fn kube_proxy_metrics(registry: &mut Registry, st: &AgentStatus) {
    let family_labels = |family: &str| vec![("ip_family".to_string(), family.to_string())];
    for (name, help, histograms) in [
        (
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "[ALPHA] SyncProxyRules latency in seconds",
            &st.syncs.all,
        ),
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "[ALPHA] SyncProxyRules latency in seconds for full resyncs",
            &st.syncs.full,
        ),
        (
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "[ALPHA] SyncProxyRules latency in seconds for partial resyncs",
            &st.syncs.partial,
        ),
        (
            "kubeproxy_network_programming_duration_seconds",
            "[ALPHA] In Cluster Network Programming Latency in seconds",
            &st.syncs.network_programming,
        ),
    ] {
        registry.register(name, help, histograms.clone());
    }
    for (name, help, at) in [
        (
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "[ALPHA] The last time proxy rules were successfully synced",
            st.last_sync,
        ),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "[ALPHA] The last time a sync of proxy rules was queued",
            st.last_queued,
        ),
    ] {
        let gauges = float_gauge_family(registry, name, help);
        for family in st.ip_families() {
            gauges.get_or_create(&family_labels(family)).set(unix_seconds(at));
        }
    }
    let changes = &st.changes;
    gauge(
        registry,
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "[ALPHA] Pending proxy rules Endpoint changes",
        changes.endpoints_pending as i64,
    );
    counter(
        registry,
        "kubeproxy_sync_proxy_rules_endpoint_changes",
        "[ALPHA] Cumulative proxy rules Endpoint changes",
        changes.endpoints_total,
    );
    gauge(
        registry,
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "[ALPHA] Pending proxy rules Service changes",
        changes.services_pending as i64,
    );
    counter(
        registry,
        "kubeproxy_sync_proxy_rules_service_changes",
        "[ALPHA] Cumulative proxy rules Service changes",
        changes.services_total,
    );
    let no_local = gauge_family(
        registry,
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "[ALPHA] Number of services with a Local traffic policy and no endpoints",
    );
    for family in st.ip_families() {
        for policy in ["internal", "external"] {
            let n = st.no_local_endpoints.get(&(family, policy)).copied().unwrap_or(0);
            let labels = vec![
                ("ip_family".to_string(), family.to_string()),
                ("traffic_policy".to_string(), policy.to_string()),
            ];
            no_local.get_or_create(&labels).set(n as i64);
        }
    }
    // A failed sync of the maps, under the name of kube-proxy's default
    // (iptables) mode, so its sync-failure alerts keep working.
    let failures = counter_family(
        registry,
        "kubeproxy_sync_proxy_rules_iptables_restore_failures",
        "[ALPHA] Cumulative proxy iptables restore failures",
    );
    for family in st.ip_families() {
        failures
            .get_or_create(&family_labels(family))
            .inc_by(st.errors.get(operation::SYNC).copied().unwrap_or(0));
    }
    status_code_counters(
        registry,
        (
            "kubeproxy_proxy_healthz",
            "[ALPHA] Cumulative proxy healthz HTTP status",
        ),
        &st.healthz_answers,
    );
    status_code_counters(
        registry,
        ("kubeproxy_proxy_livez", "[ALPHA] Cumulative proxy livez HTTP status"),
        &st.livez_answers,
    );
}

/// The process metrics of Prometheus' Go client (kube-proxy's
/// `process_*`), read from /proc/self; one that cannot be read is left out.
fn process_metrics(registry: &mut Registry) {
    use procfs::process::{LimitValue, Process};
    let Ok(me) = Process::myself() else { return };
    let limit = |v: LimitValue| match v {
        LimitValue::Unlimited => -1.0,
        LimitValue::Value(n) => n as f64,
    };
    let float = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let gauge = FloatGauge::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    };
    if let Ok(stat) = me.stat() {
        let ticks = procfs::ticks_per_second() as f64;
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        cpu.inc_by((stat.utime + stat.stime) as f64 / ticks);
        registry.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        );
        float(
            registry,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            stat.vsize as f64,
        );
        float(
            registry,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            (stat.rss * procfs::page_size()) as f64,
        );
        if let Ok(boot) = procfs::boot_time_secs() {
            float(
                registry,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                boot as f64 + stat.starttime as f64 / ticks,
            );
        }
    }
    if let Ok(fds) = me.fd_count() {
        float(
            registry,
            "process_open_fds",
            "Number of open file descriptors",
            fds as f64,
        );
    }
    if let Ok(limits) = me.limits() {
        float(
            registry,
            "process_max_fds",
            "Maximum number of open file descriptors",
            limit(limits.max_open_files.soft_limit),
        );
        float(
            registry,
            "process_virtual_memory_max_bytes",
            "Maximum amount of virtual memory available in bytes",
            limit(limits.max_address_space.soft_limit),
        );
    }
}

/// Our own metrics about the agent (`lbagent_*`).
fn agent_metrics(registry: &mut Registry, st: &AgentStatus) {
    registry.register(
        "sync_duration_seconds",
        "Duration of syncs of the datapath maps",
        st.sync_seconds.clone(),
    );
    let last = FloatGauge::default();
    last.set(unix_seconds(st.last_sync));
    registry.register(
        "last_sync_timestamp_seconds",
        "Unix time of the last successful sync",
        last,
    );
    gauge(
        registry,
        "service_ports",
        "Service ports (frontends) programmed",
        st.service_ports as i64,
    );
    gauge(registry, "backends", "Backends programmed", st.backends.len() as i64);
    status_code_counters(
        registry,
        ("proxy_healthz", "/healthz answers by HTTP status code"),
        &st.healthz_answers,
    );
    status_code_counters(
        registry,
        ("proxy_livez", "/livez answers by HTTP status code"),
        &st.livez_answers,
    );
    let errors = counter_family(
        registry,
        "errors",
        "Recoverable errors the agent logged and carried on after, by operation",
    );
    for op in operation::ALL {
        errors
            .get_or_create(&vec![("operation".into(), op.into())])
            .inc_by(st.errors.get(op).copied().unwrap_or(0));
    }
    counter(
        registry,
        "interfaces_vanished",
        "Interfaces removed before the agent attached to them or listed them for XDP (pod churn; not an error)",
        st.interfaces_vanished,
    );
}

/// What /metrics reads from the datapath: the pinned maps (a fake in tests).
pub trait DatapathCounters {
    fn drops(&self, reason: DropReason) -> anyhow::Result<u64>;
    fn events(&self, event: FlowEvent) -> anyhow::Result<u64>;
    fn service_counter(&self, id: u32) -> anyhow::Result<TrafficCounter>;
    fn backend_counter(&self, id: BackendId) -> anyhow::Result<TrafficCounter>;
    /// (map, entries, capacity) of each map.
    fn fill(&self) -> Vec<(&'static str, usize, u32)>;
}

impl DatapathCounters for BpfMaps {
    fn drops(&self, reason: DropReason) -> anyhow::Result<u64> {
        BpfMaps::drops(self, reason)
    }
    fn events(&self, event: FlowEvent) -> anyhow::Result<u64> {
        BpfMaps::events(self, event)
    }
    fn service_counter(&self, id: u32) -> anyhow::Result<TrafficCounter> {
        BpfMaps::service_counter(self, id)
    }
    fn backend_counter(&self, id: BackendId) -> anyhow::Result<TrafficCounter> {
        BpfMaps::backend_counter(self, id)
    }
    fn fill(&self) -> Vec<(&'static str, usize, u32)> {
        BpfMaps::fill(self)
    }
}

/// Our datapath metrics (`lbagent_*`), read from the pinned maps; the
/// per-backend series only when asked for (`--metrics-per-backend`: one
/// series per endpoint is unbounded on a big cluster).
fn datapath_metrics(registry: &mut Registry, st: &AgentStatus, maps: &dyn DatapathCounters, per_backend: bool) {
    labelled_counters(
        registry,
        ("drops", "Packets dropped by the datapath, by reason", "reason"),
        DropReason::ALL.map(|r| (r.name(), maps.drops(r))),
    );
    labelled_counters(
        registry,
        ("flow_events", "Datapath events that are not drops, by event", "event"),
        FlowEvent::ALL.map(|e| (e.name(), maps.events(e))),
    );
    let svc_packets = counter_family(registry, "service_packets", "Packets balanced, per service port");
    let svc_bytes = counter_family(registry, "service_bytes", "Bytes balanced, per service port");
    for (&id, (name, frontend)) in &st.services {
        if let Ok(c) = maps.service_counter(id) {
            let labels = vec![("service".into(), name.clone()), ("frontend".into(), frontend.clone())];
            svc_packets.get_or_create(&labels).inc_by(c.packets);
            svc_bytes.get_or_create(&labels).inc_by(c.bytes);
        }
    }
    if per_backend {
        let be_packets = counter_family(registry, "backend_packets", "Packets sent, per backend");
        for (&id, (name, endpoint)) in &st.backends {
            if let Ok(c) = maps.backend_counter(id) {
                let labels = vec![("service".into(), name.clone()), ("endpoint".into(), endpoint.clone())];
                be_packets.get_or_create(&labels).inc_by(c.packets);
            }
        }
    }
    let entries = gauge_family(registry, "map_entries", "Entries in a datapath map");
    let capacity = gauge_family(registry, "map_capacity", "Capacity of a datapath map");
    for (map, count, max) in maps.fill() {
        entries
            .get_or_create(&vec![("map".into(), map.into())])
            .set(count as i64);
        capacity
            .get_or_create(&vec![("map".into(), map.into())])
            .set(max as i64);
    }
}

/// The Content-Type of what `render` writes: Prometheus' classic text
/// format (0.0.4), which kube-proxy serves to a plain scrape.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The text exposition of everything, now: kube-proxy's metrics,
/// `process_*`, ours about the agent, and the datapath's when `maps` are given.
pub fn render(status: &SharedStatus, maps: Option<&dyn DatapathCounters>, per_backend: bool) -> String {
    let mut registry = Registry::default();
    process_metrics(&mut registry);
    let st = lock(status);
    kube_proxy_metrics(&mut registry, &st);
    let ours = registry.sub_registry_with_prefix("lbagent");
    agent_metrics(ours, &st);
    if let Some(maps) = maps {
        datapath_metrics(ours, &st, maps, per_backend);
    }
    drop(st);
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        error!("encoding metrics: {e}");
    }
    out
}

/// Serves `/metrics` on `listener` (bound at start-up, so a taken port
/// fails start-up), reading `maps` (the pinned ones, opened at start-up);
/// `per_backend`: also the per-backend series.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    status: SharedStatus,
    maps: BpfMaps,
    per_backend: bool,
) -> anyhow::Result<()> {
    let maps = Arc::new(Mutex::new(maps));
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let (status, maps) = (status.clone(), maps.clone());
            async move {
                let maps = maps.lock().unwrap_or_else(|e| e.into_inner());
                let body = render(&status, Some(&*maps as &dyn DatapathCounters), per_backend);
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
            }
        }),
    );
    info!(addr = %listener.local_addr()?, "metrics server listening");
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};

    /// promtool on a file (rule and test files name others by path).
    fn promtool(args: &[&str]) -> (bool, String) {
        lb_tests::promtool::run(args, "")
    }

    /// A file of this test process in the temporary directory.
    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lbagent-metrics-{}-{name}", std::process::id()))
    }

    fn ipv4_status() -> SharedStatus {
        let status = SharedStatus::default();
        lock(&status).families = FamilyFlags { v4: true, v6: false };
        status
    }

    /// The samples of an exposition: series → value.
    fn samples(text: &str) -> BTreeMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_string(), value.to_string())
            })
            .collect()
    }

    #[test]
    fn exposition_has_kube_proxys_metrics_and_passes_promtool_check() {
        let status = ipv4_status();
        {
            let mut st = lock(&status);
            st.observe_sync(true, Duration::from_millis(3));
            st.observe_sync(false, Duration::from_millis(3));
            st.queue_change();
            st.last_sync = Some(SystemTime::now());
            st.healthz_answers.insert(200, 2);
            st.livez_answers.insert(503, 1);
            st.no_local_endpoints.insert(("IPv4", "internal"), 3);
            st.changes.endpoints_total = 7;
            *st.errors.entry(operation::SYNC).or_default() += 1;
        }
        let text = render(&status, None, false);
        let got = samples(&text);
        for (series, value) in [
            (
                "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
                "2",
            ),
            (
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"}",
                "2",
            ),
            (
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.002\"}",
                "0",
            ),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
                "1",
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
                "1",
            ),
            ("kubeproxy_proxy_healthz_total{code=\"200\"}", "2"),
            ("kubeproxy_proxy_livez_total{code=\"503\"}", "1"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "7"),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", "0"),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}",
                "3",
            ),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}",
                "0",
            ),
            (
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"}",
                "1",
            ),
            ("lbagent_sync_duration_seconds_count", "2"),
            ("lbagent_proxy_healthz_total{code=\"200\"}", "2"),
            ("lbagent_errors_total{operation=\"sync\"}", "1"),
        ] {
            assert_eq!(got.get(series).map(String::as_str), Some(value), "{series} in\n{text}");
        }
        // kube-proxy's buckets: 1 ms … 16.384 s.
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"16.384\"}"));
        for name in [
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let v: f64 = got
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .parse()
                .unwrap();
            assert!(v > 0.0, "{name} {v}");
        }
        assert!(got.contains_key("process_cpu_seconds_total"), "{text}");
        assert!(!text.contains("# EOF"), "classic text format, not OpenMetrics");
        if let Err(problems) = lb_tests::promtool::check_metrics(&text) {
            panic!("promtool check metrics:\n{problems}\n{text}");
        }
    }

    /// kubernetes-mixin's kube-proxy alerts and its Proxy dashboard's
    /// queries, evaluated by `promtool test rules` on series scraped from
    /// our exposition once a minute while the agent syncs 6 times a minute.
    #[test]
    fn kube_proxy_mixin_alerts_and_dashboard_queries_work_on_our_series() {
        let status = ipv4_status();
        let mut series: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let scrapes = 6;
        for minute in 0..scrapes {
            for (s, v) in samples(&render(&status, None, false)) {
                let labelled = match s.split_once('{') {
                    Some((name, rest)) => format!("{name}{{job=\"kube-proxy\",instance=\"node-1:10249\",{rest}"),
                    None => format!("{s}{{job=\"kube-proxy\",instance=\"node-1:10249\"}}"),
                };
                let values = series.entry(labelled).or_default();
                values.resize(minute, "_".into());
                values.push(v);
            }
            let mut st = lock(&status);
            for _ in 0..6 {
                st.observe_sync(false, Duration::from_millis(3));
            }
            st.observe_network_programming(false, Duration::from_millis(1500));
            *st.healthz_answers.entry(200).or_default() += 1;
        }
        let mut input = String::new();
        writeln!(
            input,
            "  - series: 'up{{job=\"kube-proxy\",instance=\"node-1:10249\"}}'"
        )
        .unwrap();
        writeln!(input, "    values: '{}'", vec!["1"; scrapes].join(" ")).unwrap();
        for (s, values) in &series {
            writeln!(input, "  - series: '{s}'\n    values: '{}'", values.join(" ")).unwrap();
        }
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube-proxy-mixin-alerts.yaml");
        let instance = "instance=\"node-1:10249\",job=\"kube-proxy\"";
        let test = format!(
            r#"rule_files:
- {rules}
evaluation_interval: 1m
tests:
- interval: 1m
  input_series:
{input}
  alert_rule_test:
  - eval_time: 5m
    alertname: KubeProxyDown
    exp_alerts: []
  - eval_time: 5m
    alertname: KubeProxyInstanceUnreachable
    exp_alerts: []
  # The target is gone after 5m: absent from 10m (staleness), firing 15m later.
  - eval_time: 26m
    alertname: KubeProxyDown
    exp_alerts:
    - exp_labels:
        severity: critical
        job: kube-proxy
      exp_annotations:
        description: KubeProxy has disappeared from Prometheus target discovery.
        summary: Target disappeared from Prometheus target discovery.
        runbook_url: https://github.com/kubernetes-monitoring/kubernetes-mixin/tree/master/runbook.md#alert-name-kubeproxydown
  promql_expr_test:
  # The Proxy dashboard's panels (dashboards/proxy.libsonnet).
  - expr: sum(rate(kubeproxy_sync_proxy_rules_duration_seconds_count{{job="kube-proxy", instance=~".+"}}[5m]))
    eval_time: 5m
    exp_samples:
    - value: 0.1
  - expr: histogram_quantile(0.99,rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket{{job="kube-proxy", instance=~".+"}}[5m]))
    eval_time: 5m
    exp_samples:
    - labels: '{{ip_family="IPv4",{instance}}}'
      value: 0.00398
  - expr: sum(rate(kubeproxy_network_programming_duration_seconds_count{{job="kube-proxy", instance=~".+"}}[5m]))
    eval_time: 5m
    exp_samples:
    - value: 0.016666666666666666
  - expr: histogram_quantile(0.99, sum(rate(kubeproxy_network_programming_duration_seconds_bucket{{job="kube-proxy", instance=~".+"}}[5m])) by (instance, le))
    eval_time: 5m
    exp_samples:
    - labels: '{{instance="node-1:10249"}}'
      value: 1.9900000000000002
  - expr: sum(up{{job="kube-proxy"}})
    eval_time: 5m
    exp_samples:
    - value: 1
  - expr: count(process_resident_memory_bytes{{job="kube-proxy", instance=~".+"}} > 0)
    eval_time: 5m
    exp_samples:
    - value: 1
  - expr: count(rate(process_cpu_seconds_total{{job="kube-proxy", instance=~".+"}}[5m]) >= 0)
    eval_time: 5m
    exp_samples:
    - value: 1
  - expr: sum(rate(kubeproxy_proxy_healthz_total{{job="kube-proxy", code="200"}}[5m]))
    eval_time: 5m
    exp_samples:
    - value: 0.016666666666666666
"#,
            rules = rules.display()
        );
        let file = scratch("kube-proxy-test.yaml");
        std::fs::write(&file, &test).unwrap();
        let (ok, out) = promtool(&["test", "rules", file.to_str().unwrap()]);
        assert!(ok, "promtool test rules:\n{out}\n{test}");
        let _ = std::fs::remove_file(file);
    }

    /// Counters of a datapath that saw one packet of everything.
    struct FakeDatapath;

    impl DatapathCounters for FakeDatapath {
        fn drops(&self, _: DropReason) -> anyhow::Result<u64> {
            Ok(1)
        }
        fn events(&self, _: FlowEvent) -> anyhow::Result<u64> {
            Ok(1)
        }
        fn service_counter(&self, _: u32) -> anyhow::Result<TrafficCounter> {
            Ok(TrafficCounter { packets: 1, bytes: 100 })
        }
        fn backend_counter(&self, _: BackendId) -> anyhow::Result<TrafficCounter> {
            Ok(TrafficCounter { packets: 1, bytes: 100 })
        }
        fn fill(&self) -> Vec<(&'static str, usize, u32)> {
            vec![("CONNTRACK", 1, 65536)]
        }
    }

    fn status_with_a_service() -> SharedStatus {
        let status = ipv4_status();
        let name = "net-test/web:http".to_string();
        lock(&status)
            .services
            .insert(1, (name.clone(), "198.19.0.10:80/TCP".into()));
        lock(&status).backends.insert(7, (name, "198.18.1.1:8080".into()));
        status
    }

    #[test]
    fn per_backend_series_only_when_asked_for() {
        let status = status_with_a_service();
        let off = render(&status, Some(&FakeDatapath), false);
        assert!(!off.contains("lbagent_backend_packets"), "{off}");
        assert!(
            off.contains(
                "lbagent_service_packets_total{service=\"net-test/web:http\",frontend=\"198.19.0.10:80/TCP\"} 1"
            ),
            "{off}"
        );
        let on = render(&status, Some(&FakeDatapath), true);
        assert!(
            on.contains("lbagent_backend_packets_total{service=\"net-test/web:http\",endpoint=\"198.18.1.1:8080\"} 1"),
            "{on}"
        );
    }

    /// deploy/grafana's dashboard: every query is valid PromQL (`promtool
    /// check rules` on them as recording rules) and reads only series we serve.
    #[test]
    fn grafana_dashboard_queries_parse_and_read_served_series() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/lb-agent-datapath.json");
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let exposition = render(&status_with_a_service(), Some(&FakeDatapath), true);
        let served: std::collections::BTreeSet<String> = samples(&exposition)
            .into_keys()
            .map(|s| s.split('{').next().unwrap().to_string())
            .collect();
        let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(panels.len() >= 10);
        for (i, panel) in panels.iter().enumerate() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "5m")
                    .replace("$job", ".+")
                    .replace("$instance", ".+");
                let names = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("lbagent_") || w.starts_with("kubeproxy_"));
                for name in names {
                    assert!(
                        served.contains(name),
                        "panel {:?}: {name} is not served",
                        panel["title"]
                    );
                }
                writeln!(
                    rules,
                    "  - record: dashboard:panel{i}\n    expr: {}",
                    serde_json::Value::from(expr)
                )
                .unwrap();
            }
        }
        let file = scratch("dashboard-rules.yaml");
        std::fs::write(&file, &rules).unwrap();
        let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()]);
        assert!(ok, "promtool check rules:\n{out}\n{rules}");
        let _ = std::fs::remove_file(file);
    }
}
