//! `lb-agent run`: source → model → change tracker → sync → maps, and the
//! TC attachments. Nothing is attached before the first full sync.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Duration, sleep_until};
use tracing::{error, info, warn};

use crate::cli::{ForwardingMode, RunArgs};
use crate::datapath::xdp::{XdpModeArg, XdpPath};
use crate::datapath::{ConntrackTimeouts, Datapath, LoadOptions, attach};
use crate::health::HealthServers;
use crate::metrics::SharedStatus;
use crate::model::{Cidr, FamilyFlags, Model, NodeContext, NodePortAddress, Snapshot};
use crate::source::{self, SourceState};
use crate::sync::{MapContents, Syncer};
use lb_common::cidr_kind;

/// How soon a failed sync is retried (as a full resync).
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.xdp_mode != XdpModeArg::Off && args.xdp_interfaces.is_empty() {
        anyhow::bail!(
            "--xdp-mode {:?} needs --xdp-interfaces: the node's external interfaces (e.g. eth0)",
            args.xdp_mode
        );
    }
    let endpoints = Endpoints::bind(&args)?;
    let conntrack_entries = args.conntrack_entries(cpu_count());
    // The LRU map is allocated whole up front (~150 bytes an entry).
    info!(
        entries = conntrack_entries,
        mib = (conntrack_entries as u64 * 150) >> 20,
        "conntrack table size (--conntrack-max-per-core, --conntrack-min or --conntrack-max)"
    );
    let mut datapath = Datapath::load(&LoadOptions {
        bpf_root: Some(args.bpf_root.clone()),
        conntrack_max: conntrack_entries,
        max_services: args.max_services,
        max_backends: args.max_backends,
    })?;
    let result = serve(&args, &mut datapath, endpoints).await;
    if args.cleanup_on_exit {
        datapath.remove_pins();
    }
    result
}

/// The CPUs this process may run on (Go's runtime.NumCPU, which kube-proxy sizes conntrack by).
fn cpu_count() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// kube-proxy's BoundedFrequencyRunner: at most one sync per
/// `min_interval` on average, with a burst of two so a change after a quiet
/// period is applied at once.
pub struct SyncLimiter {
    min_interval: Duration,
    tokens: f64,
    last: tokio::time::Instant,
}

const BURST_SYNCS: f64 = 2.0;

impl SyncLimiter {
    pub fn new(min_interval: Duration) -> Self {
        SyncLimiter {
            min_interval,
            tokens: BURST_SYNCS,
            last: tokio::time::Instant::now(),
        }
    }

    fn refill(&mut self, now: tokio::time::Instant) {
        if self.min_interval.is_zero() {
            self.tokens = BURST_SYNCS;
        } else {
            let gained = now.duration_since(self.last).as_secs_f64() / self.min_interval.as_secs_f64();
            self.tokens = (self.tokens + gained).min(BURST_SYNCS);
        }
        self.last = now;
    }

    /// When the next sync may run.
    pub fn next_allowed(&mut self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + self.min_interval.mul_f64(1.0 - self.tokens)
        }
    }

    pub fn take(&mut self) {
        self.refill(tokio::time::Instant::now());
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

/// Starts the source's task. A source that can never work (a kubeconfig
/// that does not parse, no credentials, no TLS roots) fails start-up here,
/// loudly, instead of leaving an agent that looks alive and never syncs.
async fn start_source(args: &RunArgs, node_name: &str, state: Arc<SourceState>) -> anyhow::Result<()> {
    match &args.manifests {
        Some(path) => {
            info!(path = %path.display(), "source: manifests");
            let manifests = source::manifests::ManifestSource::new(path);
            tokio::spawn(source::manifests::run(
                manifests,
                state,
                args.manifests_debounce,
                args.sync_period,
            ));
        }
        None => {
            let (kubeconfig, master) = (args.kubeconfig.clone(), args.master.clone());
            let node_name = node_name.to_string();
            info!(kubeconfig = ?kubeconfig, master = ?master.as_ref().map(ToString::to_string), "source: Kubernetes API");
            let client = source::kube::client(kubeconfig.as_deref(), master.as_ref())
                .await
                .context("cannot set up the Kubernetes API client (--kubeconfig, --master, in-cluster config)")?;
            tokio::spawn(source::kube::run(client, node_name, state));
        }
    }
    Ok(())
}

/// What the model needs to know about this node besides the objects.
struct NodeSettings {
    name: String,
    addrs: Vec<std::net::IpAddr>,
    nodeport_cidrs: Vec<NodePortAddress>,
    masquerade_all: bool,
    cluster_cidr_known: FamilyFlags,
    maglev_table_size: u32,
    /// --lb-algorithm maglev.
    maglev_default: bool,
    /// This node's Node object was seen (its later absence means deleted).
    node_object_seen: bool,
}

impl NodeSettings {
    fn context(&self, snapshot: &Snapshot) -> NodeContext {
        let mut ctx = NodeContext::from_snapshot(&self.name, snapshot);
        let primary = self.primary_addrs(snapshot);
        let listens = |ip: std::net::IpAddr| {
            self.nodeport_cidrs.is_empty() || self.nodeport_cidrs.iter().any(|a| a.matches(ip, primary))
        };
        ctx.nodeport_addrs = self.addrs.iter().copied().filter(|ip| listens(*ip)).collect();
        // Host processes reach NodePorts on localhost too (the socket hooks
        // translate them; no packet with 127.0.0.1 reaches the TC program).
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        if listens(localhost) {
            ctx.nodeport_addrs.push(localhost);
        }
        ctx.node_addrs = self.addrs.clone();
        ctx.masquerade_all = self.masquerade_all;
        ctx.maglev_table_size = self.maglev_table_size;
        ctx.default_table_size = if self.maglev_default { self.maglev_table_size } else { 0 };
        ctx.cluster_cidr_known = self.cluster_cidr_known;
        ctx
    }

    /// This node's primary addresses (its Node object's), for
    /// `--nodeport-addresses primary`.
    fn primary_addrs<'a>(&self, snapshot: &'a Snapshot) -> &'a [std::net::IpAddr] {
        snapshot
            .nodes
            .iter()
            .find(|n| n.name == self.name)
            .map(|n| n.primary.as_slice())
            .unwrap_or_default()
    }

    /// Where healthCheckNodePorts listen: every address (empty) or, with
    /// --nodeport-addresses, the node addresses in them (as kube-proxy).
    fn health_check_addrs(&self, snapshot: &Snapshot) -> Vec<std::net::IpAddr> {
        if self.nodeport_cidrs.is_empty() {
            return Vec::new();
        }
        let primary = self.primary_addrs(snapshot);
        self.addrs
            .iter()
            .copied()
            .filter(|ip| self.nodeport_cidrs.iter().any(|a| a.matches(*ip, primary)))
            // A link-local address needs a scope to bind.
            .filter(|ip| !matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect()
    }

    /// The families the node has addresses of (loopback aside).
    fn families(&self) -> FamilyFlags {
        FamilyFlags::holding(self.addrs.iter().filter(|ip| !ip.is_loopback()))
    }

    /// kube-proxy's node eligibility from this node's Node object. Without
    /// one (manifests without Nodes) the node is eligible, as kube-proxy's
    /// is until a node event says otherwise; once seen, its disappearance
    /// means it was deleted.
    fn eligible(&mut self, snapshot: &Snapshot) -> bool {
        match snapshot.nodes.iter().find(|n| n.name == self.name) {
            Some(n) => {
                self.node_object_seen = true;
                n.eligible()
            }
            None => !self.node_object_seen,
        }
    }

    fn build_model(&self, snapshot: &Snapshot) -> Model {
        if !snapshot.nodes.is_empty() && !snapshot.nodes.iter().any(|n| n.name == self.name) {
            warn!(node_name = %self.name, "no Node object with this name");
        }
        let (model, warnings) = Model::build(snapshot, &self.context(snapshot));
        for w in warnings {
            warn!("{w}");
        }
        model
    }
}

async fn serve(args: &RunArgs, datapath: &mut Datapath, endpoints: Endpoints) -> anyhow::Result<()> {
    let mut node = NodeSettings {
        name: args.node_name(),
        addrs: attach::list_addresses().await?,
        nodeport_cidrs: args.nodeport_addresses.clone(),
        masquerade_all: args.masquerade_all,
        cluster_cidr_known: FamilyFlags::holding(args.cluster_cidr.iter().map(|c| &c.addr)),
        maglev_table_size: args.maglev_table_size,
        maglev_default: args.lb_algorithm == "maglev",
        node_object_seen: false,
    };
    let cidrs: Vec<(Cidr, u32)> = args
        .cluster_cidr
        .iter()
        .map(|c| (*c, cidr_kind::CLUSTER))
        .chain(args.service_cluster_ip_range.iter().map(|c| (*c, cidr_kind::SERVICE)))
        .collect();
    datapath
        .maps
        .set_cidrs(&cidrs)
        .context("programming --cluster-cidr / --service-cluster-ip-range")?;
    let cgroup_root = crate::datapath::sock::cgroup2_root(args.cgroup_root.as_deref())?;
    let secs = |d: Duration| d.as_secs().clamp(1, u32::MAX as u64) as u32;
    let timeouts = ConntrackTimeouts {
        tcp_syn: secs(args.conntrack_tcp_timeout_syn),
        tcp_established: secs(args.conntrack_tcp_timeout_established),
        tcp_close_wait: secs(args.conntrack_tcp_timeout_close_wait),
        tcp_closing: secs(args.conntrack_tcp_timeout_close),
        udp: secs(args.conntrack_udp_timeout),
        udp_stream: secs(args.conntrack_udp_timeout_stream),
    };
    let stack_forwarding = args.forwarding_mode == ForwardingMode::Stack;
    datapath
        .maps
        .write_node_config(crate::datapath::sock::netns_cookie()?, &timeouts, stack_forwarding)?;
    if stack_forwarding && args.xdp_mode != XdpModeArg::Off {
        warn!("--forwarding-mode stack: the XDP fast path hands every balanced flow to the stack");
    }
    let status: SharedStatus = Arc::default();
    start_conntrack_gc(&args.bpf_root, args.conntrack_gc_interval, status.clone())?;
    let state = Arc::new(SourceState::default());
    start_source(args, &node.name, state.clone()).await?;
    lock_status(&status).families = node.families();
    endpoints.start(args, &status)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut health = HealthServers::new(status.clone(), health_timeout(args));

    // Nothing is programmed before the source has listed everything once.
    let (snapshot, mut applied_generation) = loop {
        if let Some(s) = state.snapshot() {
            break s;
        }
        tokio::select! {
            () = state.changed() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    };
    let mut syncer = Syncer::with_limits(args.max_services, args.max_backends);
    if let Some(previous) = datapath.previous_maps() {
        // A restart: keep the ids the maps (and conntrack) already use.
        let adopted = syncer
            .adopt(previous)
            .context("reading the pinned maps of the previous agent")?;
        info!(
            service_ports = adopted,
            "took over the pinned maps of the previous agent"
        );
    }
    let mut limiter = SyncLimiter::new(args.min_sync_period);
    limiter.take();
    lock_status(&status).node_eligible = node.eligible(&snapshot);
    let model = node.build_model(&snapshot);
    // A service the maps cannot take (ids or a map full) does not stop
    // the agent: the others are programmed, the failure is counted and
    // retried as a full resync, and /healthz turns unhealthy if it lasts.
    let first_sync_ok = sync_once(&mut syncer, datapath, &model, applied_generation, &status, None);
    if first_sync_ok {
        health.update(&model.health_checks, &node.health_check_addrs(&snapshot));
        report_sync(&status, &syncer, &model);
        note_changes(&status, &state, Some(applied_generation));
    } else {
        lock_status(&status).queue_change();
    }
    info!(
        service_ports = model.services.len(),
        generation = applied_generation,
        ok = first_sync_ok,
        "first sync done"
    );

    datapath.attach_socket_hooks(&cgroup_root)?;
    let mut links = attach::watch_interfaces()?;
    let mut attachers = Attachers {
        ingress: attach::Attacher::new(attach::TcIngress, args.interfaces.clone(), datapath.pin_root())?,
        egress: attach::Attacher::new(attach::TcEgress, args.interfaces.clone(), datapath.pin_root())?,
        xdp: XdpPath::new(
            args.xdp_mode,
            &args.xdp_interfaces,
            &args.xdp_redirect_interfaces,
            datapath.pin_root(),
        )?,
        status: status.clone(),
    };
    let interfaces = attach::list_interfaces().await?;
    attachers.ingress.sweep_stale_pins(&interfaces);
    attachers.egress.sweep_stale_pins(&interfaces);
    for iface in &interfaces {
        attachers.attach_tc(datapath, iface);
    }
    attachers.xdp.start(datapath, &interfaces)?;
    attachers.refresh_xdp_egress(datapath);
    // Every interface runs the new programs: the old maps can go.
    datapath.finish_migration();
    if attachers.ingress.attached().next().is_none() {
        warn!("no interface to attach to yet; waiting for one to appear");
    }
    info!(interfaces = ?attachers.ingress.attached().collect::<Vec<_>>(), node_addresses = ?node.addrs, "ready");

    let mut pending = !first_sync_ok;
    // The node's addresses changed: NodePort frontends must follow.
    let mut node_changed = false;
    let mut retry_at: Option<tokio::time::Instant> =
        (!first_sync_ok).then(|| tokio::time::Instant::now() + RETRY_AFTER);
    let mut next_full = tokio::time::Instant::now() + args.sync_period;
    // The periodic full resync's read of the maps, running on another
    // thread: changes keep being applied meanwhile.
    let mut resync_read: Option<tokio::task::JoinHandle<anyhow::Result<MapContents>>> = None;
    let result = loop {
        let sync_at = if pending {
            Some(retry_at.unwrap_or_else(|| limiter.next_allowed()))
        } else {
            None
        };
        tokio::select! {
            () = state.changed() => {
                pending = true;
                lock_status(&status).queue_change();
                note_changes(&status, &state, None);
            }
            () = sleep_until(sync_at.unwrap_or_else(tokio::time::Instant::now)), if sync_at.is_some() => {
                limiter.take();
                let ok = match state.snapshot() {
                    // Nothing new (a stale signal) and no resync asked for: skip.
                    Some((_, generation))
                        if generation == applied_generation && !node_changed && !syncer.full_resync_pending() => true,
                    Some((snapshot, generation)) => {
                        lock_status(&status).node_eligible = node.eligible(&snapshot);
                        let model = node.build_model(&snapshot);
                        let ok = sync_once(&mut syncer, datapath, &model, generation, &status, None);
                        if ok {
                            applied_generation = generation;
                            node_changed = false;
                            health.update(&model.health_checks, &node.health_check_addrs(&snapshot));
                            report_sync(&status, &syncer, &model);
                            note_changes(&status, &state, Some(generation));
                        }
                        ok
                    }
                    None => true,
                };
                pending = !ok;
                retry_at = (!ok).then(|| tokio::time::Instant::now() + RETRY_AFTER);
            }
            () = sleep_until(next_full) => {
                next_full = tokio::time::Instant::now() + args.sync_period;
                if resync_read.is_none() {
                    info!("periodic resync: reading the maps (changes keep being applied meanwhile)");
                    let root = args.bpf_root.clone();
                    resync_read = Some(tokio::task::spawn_blocking(move || {
                        let maps = crate::datapath::BpfMaps::open_pinned(&root)?;
                        Ok(MapContents::read(&maps)?)
                    }));
                }
                // Link events can be lost (a netlink buffer overrun under
                // heavy churn): the periodic resync also re-lists interfaces.
                attachers.reconcile(datapath).await;
            }
            read = async { resync_read.as_mut().expect("guarded").await }, if resync_read.is_some() => {
                resync_read = None;
                let read = read.map_err(anyhow::Error::from).and_then(|r| r);
                let ok = match (read, state.snapshot()) {
                    (Ok(actual), Some((snapshot, generation))) => {
                        lock_status(&status).node_eligible = node.eligible(&snapshot);
                        let model = node.build_model(&snapshot);
                        let ok = sync_once(&mut syncer, datapath, &model, generation, &status, Some(actual));
                        if ok {
                            applied_generation = generation;
                            node_changed = false;
                            health.update(&model.health_checks, &node.health_check_addrs(&snapshot));
                            report_sync(&status, &syncer, &model);
                            note_changes(&status, &state, Some(generation));
                        }
                        ok
                    }
                    (Err(e), _) => {
                        // Read the maps on the loop then: the next sync is a full one.
                        warn!("reading the maps for the periodic resync failed: {e:#}; resyncing in line");
                        syncer.request_full_resync();
                        false
                    }
                    (Ok(_), None) => true,
                };
                if !ok {
                    pending = true;
                    lock_status(&status).queue_change();
                }
            }
            event = links.recv() => {
                let Some(event) = event else {
                    // The event stream ended: subscribe again and catch up.
                    let e = anyhow::anyhow!("the interface event stream ended; subscribing again");
                    crate::metrics::count_error(&status, crate::metrics::operation::LINK_EVENTS, &e);
                    match attach::watch_interfaces() {
                        Ok(rx) => links = rx,
                        Err(e) => crate::metrics::count_error(&status, crate::metrics::operation::LINK_EVENTS, &e),
                    }
                    attachers.reconcile(datapath).await;
                    continue;
                };
                match event {
                    attach::LinkEvent::Added(iface) => attachers.link_added(datapath, iface),
                    attach::LinkEvent::Removed(index) => attachers.link_removed(datapath, index),
                    attach::LinkEvent::AddressesChanged => match attach::list_addresses().await {
                        Ok(addrs) if addrs != node.addrs => {
                            info!(node_addresses = ?addrs, "node addresses changed");
                            node.addrs = addrs;
                            lock_status(&status).families = node.families();
                            node_changed = true;
                            pending = true;
                        }
                        Ok(_) => {}
                        Err(e) => crate::metrics::count_error(
                            &status,
                            crate::metrics::operation::LIST_ADDRESSES,
                            &e.context("listing node addresses (retried on the next address event)"),
                        ),
                    },
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    if args.cleanup_on_exit {
        info!("shutting down: detaching programs");
        attachers.detach_all(datapath)?;
    } else {
        info!("shutting down: the datapath stays in place (pinned) for the next agent");
    }
    result
}

/// The per-interface attachments (TC ingress and egress, XDP) and the XDP
/// egress list. Nothing here ends the agent: a failure on one interface
/// (gone before the attach, a driver refusing, the egress map full) is
/// logged and counted (`lbagent_errors_total`), and the other interfaces
/// are served.
struct Attachers {
    ingress: attach::Attacher<attach::TcIngress>,
    egress: attach::Attacher<attach::TcEgress>,
    xdp: XdpPath,
    status: SharedStatus,
}

impl Attachers {
    fn count(&self, operation: &'static str, result: anyhow::Result<()>) {
        if let Err(e) = result {
            crate::metrics::count_error(&self.status, operation, &e);
        }
    }

    /// Counts a failed attach to `iface`: a race when it is gone already.
    fn count_attach(&self, iface: &attach::Interface, result: anyhow::Result<()>) {
        match result {
            Err(_) if !attach::interface_exists(iface.index) => {
                crate::metrics::count_vanished(&self.status, &iface.name, "attach")
            }
            other => self.count(crate::metrics::operation::ATTACH, other),
        }
    }

    /// TC egress and ingress on `iface` (egress first: replies of flows
    /// ingress translates need it).
    fn attach_tc(&mut self, datapath: &mut Datapath, iface: &attach::Interface) {
        let egress = datapath
            .egress_program()
            .and_then(|p| self.egress.attach(p, iface))
            .with_context(|| format!("TC egress attach to {}", iface.name));
        self.count_attach(iface, egress);
        let ingress = datapath
            .ingress_program()
            .and_then(|p| self.ingress.attach(p, iface))
            .with_context(|| format!("TC ingress attach to {}", iface.name));
        self.count_attach(iface, ingress);
    }

    fn refresh_xdp_egress(&mut self, datapath: &mut Datapath) {
        let (vanished, result) = self.xdp.refresh_egress(datapath);
        for index in vanished {
            crate::metrics::count_vanished(&self.status, &index.to_string(), "XDP egress list");
        }
        self.count(crate::metrics::operation::XDP_EGRESS, result);
    }

    fn link_added(&mut self, datapath: &mut Datapath, iface: attach::Interface) {
        self.attach_all(datapath, iface);
        self.refresh_xdp_egress(datapath);
    }

    fn link_removed(&mut self, datapath: &mut Datapath, index: u32) {
        self.forget_all(datapath, index);
        self.refresh_xdp_egress(datapath);
    }

    fn attach_all(&mut self, datapath: &mut Datapath, iface: attach::Interface) {
        self.attach_tc(datapath, &iface);
        let xdp = self.xdp.link_added(datapath, iface.clone());
        self.count_attach(&iface, xdp);
    }

    fn forget_all(&mut self, datapath: &mut Datapath, index: u32) {
        if let Ok(p) = datapath.ingress_program() {
            self.ingress.forget(p, index);
        }
        if let Ok(p) = datapath.egress_program() {
            self.egress.forget(p, index);
        }
        let xdp = self.xdp.link_removed(datapath, index);
        self.count(crate::metrics::operation::ATTACH, xdp);
    }

    /// Catches up with the interfaces now present (after lost events).
    async fn reconcile(&mut self, datapath: &mut Datapath) {
        let interfaces = match attach::list_interfaces().await {
            Ok(i) => i,
            Err(e) => {
                return crate::metrics::count_error(
                    &self.status,
                    crate::metrics::operation::LINK_EVENTS,
                    &e.context("listing interfaces"),
                );
            }
        };
        let gone: Vec<u32> = self
            .xdp
            .present()
            .filter(|index| !interfaces.iter().any(|i| i.index == *index))
            .collect();
        for index in gone {
            self.forget_all(datapath, index);
        }
        for iface in interfaces {
            // Attaching where attached already is a no-op.
            self.attach_all(datapath, iface);
        }
        self.refresh_xdp_egress(datapath);
    }

    /// Detaches everything it can; the first failure is returned after.
    fn detach_all(&mut self, datapath: &mut Datapath) -> anyhow::Result<()> {
        let xdp = self.xdp.detach_all(datapath);
        let ingress = datapath.ingress_program().map(|p| self.ingress.detach_all(p));
        let egress = datapath.egress_program().map(|p| self.egress.detach_all(p));
        xdp.and(ingress).and(egress)
    }
}

fn lock_status(status: &SharedStatus) -> std::sync::MutexGuard<'_, crate::metrics::AgentStatus> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copies the source's change counts to the status, after the changes up
/// to `programmed` (a successful sync's generation) are no longer pending;
/// their slices' trigger times give the network programming latency.
fn note_changes(status: &SharedStatus, state: &SourceState, programmed: Option<u64>) {
    let triggers = programmed
        .map(|generation| state.programmed(generation))
        .unwrap_or_default();
    let counts = state.change_counts();
    let mut st = lock_status(status);
    st.changes = counts;
    let now = std::time::SystemTime::now();
    for (ipv6, at) in triggers {
        // A trigger time ahead of our clock (skew) counts as zero.
        st.observe_network_programming(ipv6, now.duration_since(at).unwrap_or_default());
    }
}

/// Records a successful sync for /metrics and /healthz.
fn report_sync(status: &SharedStatus, syncer: &Syncer, model: &Model) {
    let mut st = lock_status(status);
    st.last_sync = Some(std::time::SystemTime::now());
    st.pending_since = None;
    st.no_local_endpoints.clear();
    for (v4, external, _) in &model.no_local_endpoints {
        let family = if *v4 { "IPv4" } else { "IPv6" };
        let policy = if *external { "external" } else { "internal" };
        *st.no_local_endpoints.entry((family, policy)).or_default() += 1;
    }
    st.service_ports = model.services.len();
    st.services.clear();
    st.backends.clear();
    for (frontend, service_id, backends) in syncer.ids() {
        let name = model
            .services
            .get(frontend)
            .map_or_else(String::new, |sp| sp.name.clone());
        for (endpoint, id) in backends {
            st.backends.insert(id, (name.clone(), endpoint.to_string()));
        }
        st.services.insert(service_id, (name, frontend.to_string()));
    }
}

/// The datapath's clock: CLOCK_MONOTONIC seconds (bpf_ktime_get_ns).
pub fn monotonic_secs() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

/// Deletes expired conntrack entries every `interval`, on its own thread
/// with its own handle on the pinned map (map operations are concurrent-safe).
/// A failed pass is logged, counted and retried on the next interval.
fn start_conntrack_gc(bpf_root: &std::path::Path, interval: Duration, status: SharedStatus) -> anyhow::Result<()> {
    let mut maps =
        crate::datapath::BpfMaps::open_pinned(bpf_root).context("opening the pinned maps for conntrack GC")?;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(interval);
            match maps.purge_expired_conntrack(monotonic_secs()) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(entries = n, "conntrack GC"),
                Err(e) => crate::metrics::count_error(
                    &status,
                    crate::metrics::operation::CONNTRACK_GC,
                    &anyhow::Error::new(e).context("conntrack GC (retried on the next interval)"),
                ),
            }
        }
    });
    Ok(())
}

/// How long a change may wait for its sync before the proxy reports
/// unhealthy: kube-proxy's twice the sync period.
fn health_timeout(args: &RunArgs) -> Duration {
    args.sync_period * 2
}

/// The listeners of /metrics and /healthz (kube-proxy's ports), bound
/// before anything else so a port that is taken fails start-up, naming the
/// flag to change, instead of leaving an agent nobody can probe.
struct Endpoints {
    metrics: Option<tokio::net::TcpListener>,
    healthz: Option<tokio::net::TcpListener>,
}

impl Endpoints {
    fn bind(args: &RunArgs) -> anyhow::Result<Self> {
        let bind = |flag: &str, v: &str| -> anyhow::Result<Option<tokio::net::TcpListener>> {
            if v.is_empty() {
                return Ok(None);
            }
            let addr: std::net::SocketAddr = v
                .parse()
                .with_context(|| format!("--{flag} {v:?}: expected ADDRESS:PORT"))?;
            let listener = crate::health::listen(addr).with_context(|| {
                format!(
                    "--{flag} {addr}: cannot listen (another process, e.g. kube-proxy, holds the port?); \
                     stop it, pass another --{flag}, or \"\" to turn the endpoint off"
                )
            });
            match listener {
                Ok(l) => Ok(Some(l)),
                // kube-proxy's bindAddressHardFail: false logs and goes on.
                Err(e) if !args.bind_address_hard_fail => {
                    tracing::error!("{e:#}; running without it (--bind-address-hard-fail=false)");
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        Ok(Endpoints {
            metrics: bind("metrics-bind-address", &args.metrics_bind_address)?,
            healthz: bind("healthz-bind-address", &args.healthz_bind_address)?,
        })
    }

    /// Serves both on their listeners.
    fn start(self, args: &RunArgs, status: &SharedStatus) -> anyhow::Result<()> {
        if let Some(listener) = self.metrics {
            let maps = crate::datapath::BpfMaps::open_pinned(&args.bpf_root)
                .context("opening the pinned maps for /metrics")?;
            let (status, per_backend) = (status.clone(), args.metrics_per_backend);
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve_metrics(listener, status, maps, per_backend).await {
                    error!("metrics server: {e:#}");
                }
            });
        }
        if let Some(listener) = self.healthz {
            let (status, timeout) = (status.clone(), health_timeout(args));
            tokio::spawn(async move {
                if let Err(e) = crate::health::serve_proxy_health(listener, status, timeout).await {
                    error!("health server: {e:#}");
                }
            });
        }
        Ok(())
    }
}

/// Hands memory freed after a big read or sync back to the kernel. glibc
/// keeps freed memory in per-thread arenas (64 MiB each): without this the
/// agent held ~270 MiB after programming 10,000 services from manifests.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free pages of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One sync — against maps read on another thread when `read` holds them
/// (the periodic full resync) — then stale UDP flows cleared and the
/// outcome logged (a failure counted); false when it failed (the next one
/// is then a full resync).
fn sync_once(
    syncer: &mut Syncer,
    datapath: &mut Datapath,
    model: &Model,
    generation: u64,
    status: &SharedStatus,
    read: Option<MapContents>,
) -> bool {
    let started = Instant::now();
    let full = read.is_some() || syncer.full_resync_pending();
    let result = match read {
        Some(actual) => syncer.resync_against(&mut datapath.maps, model, actual),
        None => syncer.sync(&mut datapath.maps, model),
    };
    lock_status(status).observe_sync(full, started.elapsed());
    match result {
        Ok(report) => {
            let stale = syncer.take_stale_udp_flows();
            match datapath.maps.clear_stale_udp_flows(&stale) {
                Ok(0) => {}
                Ok(n) => info!(
                    service_ports = stale.len(),
                    entries = n,
                    "cleared UDP conntrack entries of endpoints no longer serving"
                ),
                Err(e) => {
                    // A full resync looks at every UDP port again.
                    warn!("clearing stale UDP conntrack entries failed (retried by a full resync): {e}");
                    syncer.request_full_resync();
                }
            }
            info!(
                upserted = report.upserted,
                removed = report.removed,
                full = report.full,
                service_ports = model.services.len(),
                generation,
                elapsed_us = started.elapsed().as_micros() as u64,
                "synced"
            );
            release_freed_memory();
            true
        }
        Err(e) => {
            let e = anyhow::Error::new(e).context(format!("sync failed, full resync in {RETRY_AFTER:?}"));
            crate::metrics::count_error(status, crate::metrics::operation::SYNC, &e);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_addresses_select_per_family_and_cluster_cidrs_count_per_family() {
        let settings = NodeSettings {
            name: "node-1".into(),
            addrs: ["198.18.0.11", "198.18.16.1", "fd00:198:18::11", "fd00:198:18:16::1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            nodeport_cidrs: vec!["198.18.0.0/24".parse().unwrap(), "fd00:198:18::/64".parse().unwrap()],
            masquerade_all: false,
            cluster_cidr_known: FamilyFlags::holding(
                ["198.18.16.0/20".parse::<Cidr>().unwrap()].iter().map(|c| &c.addr),
            ),
            maglev_table_size: 0,
            maglev_default: false,
            node_object_seen: false,
        };
        let ctx = settings.context(&Snapshot::default());
        let want: Vec<std::net::IpAddr> = ["198.18.0.11", "fd00:198:18::11"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            ctx.nodeport_addrs, want,
            "IPv4 and IPv6 --nodeport-addresses, no localhost"
        );
        assert!(ctx.cluster_cidr_known.v4 && !ctx.cluster_cidr_known.v6);
        assert_eq!(
            settings.health_check_addrs(&Snapshot::default()),
            want,
            "healthCheckNodePorts listen on the --nodeport-addresses node addresses"
        );
        let everywhere = NodeSettings {
            nodeport_cidrs: vec![],
            ..settings
        };
        assert!(
            everywhere.health_check_addrs(&Snapshot::default()).is_empty(),
            "no --nodeport-addresses: the wildcard"
        );
        assert_eq!(everywhere.families(), FamilyFlags { v4: true, v6: true });
    }

    #[test]
    fn nodeport_addresses_primary_takes_the_node_objects_primary_addresses() {
        let ip = |a: &str| a.parse::<std::net::IpAddr>().unwrap();
        let settings = NodeSettings {
            name: "node-1".into(),
            addrs: vec![ip("198.18.0.11"), ip("198.18.0.12"), ip("fd00:198:18::11")],
            nodeport_cidrs: vec![NodePortAddress::Primary],
            masquerade_all: false,
            cluster_cidr_known: FamilyFlags::default(),
            maglev_table_size: 0,
            maglev_default: false,
            node_object_seen: false,
        };
        let node: k8s_openapi::api::core::v1::Node = serde_norway::from_str(
            "metadata: {name: node-1}\nstatus: {addresses: [{type: Hostname, address: node-1}, \
             {type: ExternalIP, address: 198.18.0.12}, {type: InternalIP, address: 198.18.0.11}, \
             {type: ExternalIP, address: 'fd00:198:18::11'}]}\n",
        )
        .unwrap();
        let snapshot = Snapshot {
            nodes: vec![crate::model::NodeSpec::from_k8s(&node).unwrap()],
            ..Default::default()
        };
        let want = vec![ip("198.18.0.11"), ip("fd00:198:18::11")];
        assert_eq!(
            settings.context(&snapshot).nodeport_addrs,
            want,
            "the InternalIP before an ExternalIP per family; no localhost"
        );
        assert_eq!(settings.health_check_addrs(&snapshot), want);
        assert!(
            settings.context(&Snapshot::default()).nodeport_addrs.is_empty(),
            "no Node object yet: no primary address, no NodePort"
        );
    }

    #[tokio::test]
    async fn bind_address_hard_fail_decides_whether_a_failed_bind_ends_the_agent() {
        // A service VIP range address no interface holds: EADDRNOTAVAIL, no traffic.
        let mut args = RunArgs::defaults();
        args.metrics_bind_address = "198.19.255.254:10249".into();
        args.healthz_bind_address = String::new();
        let err = Endpoints::bind(&args).err().expect("hard fail by default");
        assert!(format!("{err:#}").contains("--metrics-bind-address"), "{err:#}");
        args.bind_address_hard_fail = false;
        let endpoints = Endpoints::bind(&args).expect("kube-proxy's bindAddressHardFail: false goes on");
        assert!(endpoints.metrics.is_none() && endpoints.healthz.is_none());
    }

    #[test]
    fn node_eligibility_follows_the_node_object_and_its_deletion() {
        let mut settings = NodeSettings {
            name: "node-1".into(),
            addrs: vec![],
            nodeport_cidrs: vec![],
            masquerade_all: false,
            cluster_cidr_known: FamilyFlags::default(),
            maglev_table_size: 0,
            maglev_default: false,
            node_object_seen: false,
        };
        let with = |nodes: Vec<crate::model::NodeSpec>| Snapshot {
            nodes,
            ..Default::default()
        };
        let node = |name: &str, deleting: bool| crate::model::NodeSpec {
            name: name.into(),
            deleting,
            ..Default::default()
        };
        assert!(settings.eligible(&with(vec![])), "no Node object (manifests): eligible");
        assert!(
            settings.eligible(&with(vec![node("node-2", true)])),
            "another node's deletion"
        );
        assert!(settings.eligible(&with(vec![node("node-1", false)])));
        assert!(!settings.eligible(&with(vec![node("node-1", true)])), "being deleted");
        assert!(!settings.eligible(&with(vec![])), "seen, then gone: deleted");
    }
}
