//! `lb-agent run`: source → model → change tracker → sync → maps, and the
//! TC attachments. Nothing is attached before the first full sync.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Duration, sleep_until};
use tracing::{error, info, warn};

use crate::cli::RunArgs;
use crate::datapath::{Datapath, LoadOptions, attach};
use crate::model::{Model, NodeContext, Snapshot};
use crate::source::{self, SourceState};
use crate::sync::Syncer;

/// How soon a failed sync is retried (as a full resync).
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(&LoadOptions {
        bpf_root: Some(args.bpf_root.clone()),
        conntrack_max: args.conntrack_max,
    })?;
    let result = serve(&args, &mut datapath).await;
    datapath.unpin();
    result
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

fn start_source(args: &RunArgs, node_name: &str, state: Arc<SourceState>) -> anyhow::Result<()> {
    match &args.manifests {
        Some(path) => {
            info!(path = %path.display(), "source: manifests");
            let manifests = source::manifests::ManifestSource::new(path);
            tokio::spawn(source::manifests::run(manifests, state, args.manifests_debounce));
        }
        None => {
            let kubeconfig = args.kubeconfig.clone();
            let node_name = node_name.to_string();
            info!(kubeconfig = ?kubeconfig, "source: Kubernetes API");
            tokio::spawn(async move {
                match source::kube::client(kubeconfig.as_deref()).await {
                    Ok(client) => source::kube::run(client, node_name, state).await,
                    Err(e) => error!("cannot reach the Kubernetes API: {e:#}"),
                }
            });
        }
    }
    Ok(())
}

async fn serve(args: &RunArgs, datapath: &mut Datapath) -> anyhow::Result<()> {
    let node_name = args.node_name();
    let state = Arc::new(SourceState::default());
    start_source(args, &node_name, state.clone())?;
    let mut sigterm = signal(SignalKind::terminate())?;

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
    let mut syncer = Syncer::new();
    let mut limiter = SyncLimiter::new(args.min_sync_period);
    limiter.take();
    let model = build_model(&snapshot, &node_name);
    syncer
        .sync(&mut datapath.maps, &model)
        .context("first sync of the datapath maps")?;
    info!(
        service_ports = model.services.len(),
        generation = applied_generation,
        "first sync done"
    );

    let mut links = attach::watch_interfaces()?;
    let mut attacher = attach::Attacher::new(args.interfaces.clone());
    for iface in attach::list_interfaces().await? {
        attacher.attach(datapath.ingress_program()?, &iface)?;
    }
    if attacher.attached().next().is_none() {
        warn!("no interface to attach to yet; waiting for one to appear");
    }
    info!(interfaces = ?attacher.attached().collect::<Vec<_>>(), "ready");

    let mut pending = false;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut next_full = tokio::time::Instant::now() + args.sync_period;
    let result = loop {
        let sync_at = if pending {
            Some(retry_at.unwrap_or_else(|| limiter.next_allowed()))
        } else {
            None
        };
        tokio::select! {
            () = state.changed() => pending = true,
            () = sleep_until(sync_at.unwrap_or_else(tokio::time::Instant::now)), if sync_at.is_some() => {
                limiter.take();
                let ok = match state.snapshot() {
                    // Nothing new (a stale signal) and no resync asked for: skip.
                    Some((_, generation)) if generation == applied_generation && !syncer.full_resync_pending() => true,
                    Some((snapshot, generation)) => {
                        let ok = sync_once(&mut syncer, datapath, &build_model(&snapshot, &node_name), generation);
                        if ok {
                            applied_generation = generation;
                        }
                        ok
                    }
                    None => true,
                };
                pending = !ok;
                retry_at = (!ok).then(|| tokio::time::Instant::now() + RETRY_AFTER);
            }
            () = sleep_until(next_full) => {
                syncer.request_full_resync();
                pending = true;
                next_full = tokio::time::Instant::now() + args.sync_period;
            }
            Some(event) = links.recv() => {
                let prog = datapath.ingress_program()?;
                match event {
                    attach::LinkEvent::Added(iface) => {
                        if let Err(e) = attacher.attach(prog, &iface) {
                            error!(interface = %iface.name, "attach failed: {e:#}");
                        }
                    }
                    attach::LinkEvent::Removed(index) => attacher.forget(prog, index),
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    info!("shutting down: detaching programs");
    attacher.detach_all(datapath.ingress_program()?);
    result
}

fn build_model(snapshot: &Snapshot, node_name: &str) -> Model {
    if !snapshot.nodes.is_empty() && !snapshot.nodes.iter().any(|n| n.name == node_name) {
        warn!(node_name, "no Node object with this name");
    }
    let (model, warnings) = Model::build(snapshot, &NodeContext::from_snapshot(node_name, snapshot));
    for w in warnings {
        warn!("{w}");
    }
    model
}

/// One sync; false when it failed (the next one is then a full resync).
fn sync_once(syncer: &mut Syncer, datapath: &mut Datapath, model: &Model, generation: u64) -> bool {
    let started = Instant::now();
    match syncer.sync(&mut datapath.maps, model) {
        Ok(report) => {
            let retired = syncer.take_retired_backends();
            match datapath.maps.purge_conntrack(&retired) {
                Ok(0) => {}
                Ok(n) => info!(
                    backends = retired.len(),
                    entries = n,
                    "purged conntrack entries of removed backends"
                ),
                Err(e) => warn!("conntrack purge failed (flows still move: the datapath checks backends): {e}"),
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
            true
        }
        Err(e) => {
            error!("sync failed, full resync in {RETRY_AFTER:?}: {e}");
            false
        }
    }
}
