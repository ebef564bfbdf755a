//! Kubernetes source: watches Services, EndpointSlices and this node's Node
//! (kube-runtime watchers: list, then watch with bookmarks; relist on 410
//! Gone; reconnect with backoff). Nothing counts until every kind has been
//! listed once (kube-proxy's "synced" gate); while the API server is away,
//! the last state stays in force.

use std::sync::Arc;

use anyhow::Context;
use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, ResourceExt};
use tracing::{debug, info, warn};

use super::{Change, Kind, SourceState};
use crate::model::{FieldError, NodeSpec, ServiceSpec, SliceSpec};

/// kube-proxy's selector: services that name another proxy are not ours;
/// headless services have nothing to proxy.
const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client from a kubeconfig file, or in-cluster / $KUBECONFIG when None;
/// `master` (kube-proxy's --master) replaces the server address either
/// way. With `master` and no kubeconfig, the pod's service account (token,
/// CA) is used if mounted, else no credentials: in-cluster config alone
/// would name the `kubernetes` Service's cluster IP, which only this agent
/// programs — a fresh node without kube-proxy could never reach it.
pub async fn client(kubeconfig: Option<&std::path::Path>, master: Option<&http::Uri>) -> anyhow::Result<Client> {
    let mut config = match (kubeconfig, master) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        (None, Some(master)) => Config::incluster_dns().unwrap_or_else(|e| {
            info!("no service account credentials ({e}): talking to {master} without");
            Config::new(master.clone())
        }),
        (None, None) => Config::infer()
            .await
            .context("no --kubeconfig or --master, and neither in-cluster config nor $KUBECONFIG works")?,
    };
    if let Some(master) = master {
        config.cluster_url = master.clone();
    }
    Ok(Client::try_from(config)?)
}

/// One watcher event, reduced to what the state needs.
enum Update {
    /// A relist began (discard nothing yet).
    ListStart(Kind),
    /// An object of the current relist.
    Listed(Change),
    /// The relist is complete: its objects replace the kind's store.
    ListDone(Kind),
    Changed(Change),
}

fn updates<K, F>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    kind: Kind,
    to_change: F,
) -> impl Stream<Item = Update> + Send
where
    K: Send + 'static,
    F: Fn(&K, bool) -> Option<Change> + Send + 'static,
{
    stream.filter_map(move |event| {
        let update = match event {
            Ok(watcher::Event::Init) => Some(Update::ListStart(kind)),
            Ok(watcher::Event::InitApply(obj)) => to_change(&obj, false).map(Update::Listed),
            Ok(watcher::Event::InitDone) => Some(Update::ListDone(kind)),
            Ok(watcher::Event::Apply(obj)) => to_change(&obj, false).map(Update::Changed),
            Ok(watcher::Event::Delete(obj)) => to_change(&obj, true).map(Update::Changed),
            Err(e) => {
                // The watcher retries with backoff; the last state stays.
                warn!(?kind, "watch error (retrying, keeping the last state): {e}");
                None
            }
        };
        futures::future::ready(update)
    })
}

fn key<K: ResourceExt>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_else(|| "default".into()), obj.name_any())
}

fn converted<T>(what: &str, key: &(String, String), result: Result<T, FieldError>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            warn!("{what} {}/{}: invalid, ignored: {e}", key.0, key.1);
            None
        }
    }
}

fn service_change(svc: &Service, deleted: bool) -> Option<Change> {
    let k = key(svc);
    if deleted {
        return Some(Change::Service(k, None));
    }
    let spec = converted("Service", &k, ServiceSpec::from_k8s(svc));
    if let Some(s) = &spec {
        super::warn_ignored("Service", &k.0, &k.1, &s.ignored);
    }
    Some(Change::Service(k, spec))
}

fn slice_change(slice: &EndpointSlice, deleted: bool) -> Option<Change> {
    let k = key(slice);
    if deleted {
        return Some(Change::Slice(k, None));
    }
    let spec = converted("EndpointSlice", &k, SliceSpec::from_k8s(slice)).flatten();
    if let Some(s) = &spec {
        super::warn_ignored("EndpointSlice", &k.0, &k.1, &s.ignored);
    }
    Some(Change::Slice(k, spec))
}

fn node_change(node: &Node, deleted: bool) -> Option<Change> {
    let name = node.name_any();
    if deleted {
        return Some(Change::Node(name, None));
    }
    let spec = converted("Node", &(String::new(), name.clone()), NodeSpec::from_k8s(node));
    if let Some(n) = &spec {
        super::warn_ignored("Node", "", &n.name, &n.ignored);
    }
    Some(Change::Node(name, spec))
}

/// Runs the watches until the process ends, keeping `state` current.
pub async fn run(client: Client, node_name: String, state: Arc<SourceState>) {
    let config = watcher::Config::default();
    let services = watcher(
        Api::<Service>::all(client.clone()),
        config.clone().labels(SERVICE_SELECTOR),
    )
    .default_backoff();
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), config.clone()).default_backoff();
    let nodes = watcher(
        Api::<Node>::all(client),
        config.fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff();
    let mut merged = stream::select_all([
        updates(services, Kind::Service, service_change).boxed(),
        updates(slices, Kind::Slice, slice_change).boxed(),
        updates(nodes, Kind::Node, node_change).boxed(),
    ]);

    let mut listing: [Option<Vec<Change>>; 3] = [None, None, None];
    let mut listed = [false; 3];
    let idx = |k: Kind| k as usize;
    while let Some(update) = merged.next().await {
        match update {
            Update::ListStart(kind) => {
                debug!(?kind, "listing");
                listing[idx(kind)] = Some(Vec::new());
            }
            Update::Listed(change) => {
                let kind = match &change {
                    Change::Service(..) => Kind::Service,
                    Change::Slice(..) => Kind::Slice,
                    Change::Node(..) => Kind::Node,
                };
                listing[idx(kind)].get_or_insert_with(Vec::new).push(change);
            }
            Update::ListDone(kind) => {
                let objects = listing[idx(kind)].take().unwrap_or_default();
                info!(?kind, objects = objects.len(), "listed");
                state.replace_kind(kind, objects);
                if !listed[idx(kind)] {
                    listed[idx(kind)] = true;
                    if listed.iter().all(|l| *l) {
                        info!("initial list of services, endpoint slices and node complete");
                        state.mark_synced();
                    }
                }
            }
            Update::Changed(change) => {
                state.apply([change]);
            }
        }
    }
}
