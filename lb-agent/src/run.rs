//! `lb-agent run`: source → model → change tracker → sync → maps, and the
//! TC attachments. Nothing is attached before the first full sync.

use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Duration, sleep};
use tracing::{error, info, warn};

use crate::cli::RunArgs;
use crate::datapath::{Datapath, LoadOptions, attach};
use crate::model::Model;
use crate::source::manifests::ManifestSource;
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

async fn serve(args: &RunArgs, datapath: &mut Datapath) -> anyhow::Result<()> {
    let mut source = ManifestSource::new(&args.manifests);
    let (_watcher, mut changes) = source
        .watch()
        .with_context(|| format!("watching {}", args.manifests.display()))?;
    let mut syncer = Syncer::new();

    // First full sync, before anything is attached.
    let mut model = load_model(&mut source, &args.node_name);
    syncer
        .sync(&mut datapath.maps, &model)
        .context("first sync of the datapath maps")?;
    info!(service_ports = model.services.len(), "first sync done");

    let mut links = attach::watch_interfaces()?;
    let mut attacher = attach::Attacher::new(args.interfaces.clone());
    for iface in attach::list_interfaces().await? {
        attacher.attach(datapath.ingress_program()?, &iface)?;
    }
    if attacher.attached().next().is_none() {
        warn!("no interface to attach to yet; waiting for one to appear");
    }
    info!(interfaces = ?attacher.attached().collect::<Vec<_>>(), "ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut retry_pending = false;
    let result = loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Debounce: let a burst of writes finish, then read once.
                sleep(args.sync_debounce).await;
                while changes.try_recv().is_ok() {}
                model = load_model(&mut source, &args.node_name);
                retry_pending = !sync_once(&mut syncer, datapath, &model);
            }
            () = sleep(RETRY_AFTER), if retry_pending => {
                retry_pending = !sync_once(&mut syncer, datapath, &model);
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

fn load_model(source: &mut ManifestSource, node_name: &str) -> Model {
    let (snapshot, errors) = source.load();
    for e in &errors {
        error!("invalid manifest: {e}");
    }
    if !snapshot.nodes.is_empty() && !snapshot.nodes.iter().any(|n| n.name == node_name) {
        warn!(node_name, "no Node object with this name in the manifests");
    }
    let (model, warnings) = Model::build(&snapshot);
    for w in warnings {
        warn!("{w}");
    }
    model
}

/// One sync; false when it failed (the next one is then a full resync).
fn sync_once(syncer: &mut Syncer, datapath: &mut Datapath, model: &Model) -> bool {
    let started = Instant::now();
    match syncer.sync(&mut datapath.maps, model) {
        Ok(report) => {
            info!(
                upserted = report.upserted,
                removed = report.removed,
                full = report.full,
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
