//! Manifests source: a file or directory of Kubernetes YAML (multi-document,
//! `kind: List` too). Services, EndpointSlices and Nodes are read; other
//! kinds are ignored. A bad document is reported with its file, document
//! number and field, and the last good version of that object (or of the
//! whole file, for a YAML syntax error) stays in force, so one broken edit
//! never takes other services down.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_norway::Value;
use tokio::sync::mpsc;
use tracing::debug;

use crate::model::{FieldError, NodeSpec, ServiceSpec, SliceSpec, Snapshot};

/// A manifest problem, located precisely enough to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number within the file (0: the file as a whole).
    pub document: usize,
    /// `Kind namespace/name` when it could be read.
    pub object: Option<String>,
    /// Field path such as `spec.ports[0].port`, when the problem has one.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Identity of an object across reloads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectRef {
    kind: String,
    namespace: String,
    name: String,
}

#[derive(Clone, Debug)]
enum Object {
    Service(ServiceSpec),
    Slice(SliceSpec),
    Node(NodeSpec),
}

/// Reads a manifests path again and again, remembering each file's last good objects.
pub struct ManifestSource {
    path: PathBuf,
    last_good: BTreeMap<PathBuf, BTreeMap<ObjectRef, Object>>,
    /// A hash of each file's text when it last parsed cleanly: an
    /// unchanged file is not parsed again (a change to one small file beside
    /// a large one costs only the small one's parse).
    stamps: BTreeMap<PathBuf, u64>,
}

fn content_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl ManifestSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ManifestSource {
            path: path.into(),
            last_good: BTreeMap::new(),
            stamps: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every manifest file now (start-up, a watch overflow, the
    /// periodic rescan). Errors are returned beside the snapshot; the
    /// snapshot keeps the last good version of what failed.
    ///
    /// A file known before but missing from the directory listing is only
    /// dropped if it is really gone: a listing made while files are renamed
    /// over (how editors and config managers replace files) can miss an
    /// entry, and a file being replaced is never a deletion.
    pub fn load(&mut self) -> (Snapshot, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let listed = match manifest_files(&self.path) {
            Ok(files) => files,
            Err(e) => {
                errors.push(ManifestError {
                    file: self.path.clone(),
                    document: 0,
                    object: None,
                    field: None,
                    message: format!("cannot list manifests: {e}"),
                });
                // Keep serving what we had.
                return (self.snapshot(), errors);
            }
        };
        let mut files: BTreeSet<PathBuf> = listed.into_iter().collect();
        let known: Vec<PathBuf> = self.last_good.keys().cloned().collect();
        for file in known {
            if !files.contains(&file) {
                if file.is_file() {
                    files.insert(file);
                } else {
                    self.forget(&file);
                }
            }
        }
        for file in &files {
            self.read_file(file, &mut errors);
        }
        (self.snapshot(), errors)
    }

    /// Reads only `paths` (those a burst of watch events named): the cost
    /// of a change is the changed files', not the directory's. Paths that
    /// are missing now are returned, not dropped: the caller checks them
    /// again after a grace period (`forget_if_gone`).
    pub fn load_paths(&mut self, paths: &BTreeSet<PathBuf>) -> (Snapshot, Vec<ManifestError>, BTreeSet<PathBuf>) {
        let mut errors = Vec::new();
        let mut missing = BTreeSet::new();
        for path in paths {
            if !self.is_manifest(path) {
                continue;
            }
            if path.is_file() {
                self.read_file(path, &mut errors);
            } else if self.last_good.contains_key(path) {
                missing.insert(path.clone());
            }
        }
        (self.snapshot(), errors, missing)
    }

    /// Drops the objects of the `paths` that are still missing; true when
    /// something went. A path that is back is read again.
    pub fn forget_if_gone(&mut self, paths: &BTreeSet<PathBuf>) -> (bool, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let mut changed = false;
        for path in paths {
            if path.is_file() {
                changed |= self.read_file(path, &mut errors);
            } else if self.last_good.contains_key(path) {
                self.forget(path);
                changed = true;
            }
        }
        (changed, errors)
    }

    /// Does `path` belong to the watched manifests (the file itself, or a
    /// manifest file of the directory)?
    fn is_manifest(&self, path: &Path) -> bool {
        if !self.path.is_dir() {
            return path == self.path;
        }
        path.parent() == Some(self.path.as_path()) && has_manifest_name(path)
    }

    fn forget(&mut self, file: &Path) {
        self.last_good.remove(file);
        self.stamps.remove(file);
    }

    /// Reads and parses one file unless its text is unchanged; true when
    /// its objects may have changed. A file that cannot be read keeps its
    /// last good objects.
    fn read_file(&mut self, file: &Path, errors: &mut Vec<ManifestError>) -> bool {
        let previous = self.last_good.remove(file).unwrap_or_default();
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(file_error(file, format!("cannot read: {e}")));
                self.last_good.insert(file.to_path_buf(), previous);
                return false;
            }
        };
        let hash = content_hash(&text);
        if self.stamps.get(file) == Some(&hash) {
            self.last_good.insert(file.to_path_buf(), previous);
            return false;
        }
        let errors_before = errors.len();
        let objects = parse_file(file, &text, &previous, errors);
        // Only a clean parse is remembered: a file with errors is parsed
        // (and its errors reported) again next time.
        if errors.len() == errors_before {
            self.stamps.insert(file.to_path_buf(), hash);
        } else {
            self.stamps.remove(file);
        }
        self.last_good.insert(file.to_path_buf(), objects);
        true
    }

    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        let mut seen = BTreeMap::new();
        for (file, objects) in &self.last_good {
            for (r, obj) in objects {
                if let Some(first) = seen.insert(r.clone(), file.clone()) {
                    tracing::warn!(
                        "{} {}/{} is defined in {} and again in {}; using both may give surprising results",
                        r.kind,
                        r.namespace,
                        r.name,
                        first.display(),
                        file.display()
                    );
                }
                match obj.clone() {
                    Object::Service(s) => snap.services.push(s),
                    Object::Slice(s) => snap.slices.push(s),
                    Object::Node(n) => snap.nodes.push(n),
                }
            }
        }
        snap
    }

    /// Watches the path: every file system event that concerns the
    /// manifests, with the paths it names (or a rescan request when the
    /// kernel's queue overflowed and events were lost).
    pub fn watch(&self) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<WatchEvent>)> {
        use notify::{RecursiveMode, Watcher};
        let (tx, rx) = mpsc::unbounded_channel();
        // For a file, only events naming it count: the directory may hold
        // other files that change all the time (logs beside the manifest).
        let file_name = (!self.path.is_dir()).then(|| self.path.file_name().map(|n| n.to_os_string()));
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let event = match event {
                Ok(e) if e.need_rescan() => WatchEvent::Rescan,
                Ok(e) if e.kind.is_access() => return,
                Ok(e) => {
                    let paths: Vec<PathBuf> = e
                        .paths
                        .into_iter()
                        .filter(|p| file_name.as_ref().is_none_or(|name| p.file_name() == name.as_deref()))
                        .collect();
                    if paths.is_empty() {
                        return;
                    }
                    WatchEvent::Paths(paths)
                }
                Err(_) => WatchEvent::Rescan,
            };
            let _ = tx.send(event);
        })?;
        // Watch the directory (the parent, for a file): editors replace
        // files by renaming, which a watch on the file itself would miss.
        let dir = if self.path.is_dir() {
            self.path.clone()
        } else {
            self.path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        };
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok((watcher, rx))
    }
}

/// What the watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// These paths changed (created, written, renamed from or to, removed).
    Paths(Vec<PathBuf>),
    /// Events were lost: read everything again.
    Rescan,
}

/// `*.yaml`, `*.yml`, `*.json`, not hidden (editors' temporary files).
fn has_manifest_name(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

fn manifest_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        std::fs::metadata(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| has_manifest_name(p) && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn file_error(file: &Path, message: String) -> ManifestError {
    ManifestError {
        file: file.to_path_buf(),
        document: 0,
        object: None,
        field: None,
        message,
    }
}

fn parse_file(
    file: &Path,
    text: &str,
    previous: &BTreeMap<ObjectRef, Object>,
    errors: &mut Vec<ManifestError>,
) -> BTreeMap<ObjectRef, Object> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        match Value::deserialize(doc) {
            Ok(v) => docs.push(v),
            Err(e) => {
                errors.push(ManifestError {
                    file: file.to_path_buf(),
                    document: docs.len() + 1,
                    object: None,
                    field: None,
                    message: format!("YAML syntax: {e}; keeping this file's previous objects"),
                });
                return previous.clone();
            }
        }
    }
    let mut objects = BTreeMap::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let document = i + 1;
        let mut items = Vec::new();
        flatten_lists(doc, &mut items);
        for item in items {
            match parse_object(&item) {
                Ok(Some((r, obj))) => {
                    objects.insert(r, obj);
                }
                Ok(None) => {}
                Err((r, field, message)) => {
                    let object = r.as_ref().map(|r| format!("{} {}/{}", r.kind, r.namespace, r.name));
                    errors.push(ManifestError {
                        file: file.to_path_buf(),
                        document,
                        object,
                        field,
                        message,
                    });
                    // Like an API server refusing an update: the old object stays.
                    if let Some(r) = r
                        && let Some(old) = previous.get(&r)
                    {
                        objects.insert(r, old.clone());
                    }
                }
            }
        }
    }
    objects
}

/// `kind: List` documents (as `kubectl get -o yaml` writes) hold items.
fn flatten_lists(doc: Value, out: &mut Vec<Value>) {
    if doc.get("kind").and_then(Value::as_str) == Some("List")
        && let Some(Value::Sequence(items)) = doc.get("items")
    {
        for item in items.clone() {
            flatten_lists(item, out);
        }
        return;
    }
    if !doc.is_null() {
        out.push(doc);
    }
}

type ObjectError = (Option<ObjectRef>, Option<String>, String);

fn object_ref(doc: &Value, kind: &str) -> Option<ObjectRef> {
    let meta = doc.get("metadata")?;
    Some(ObjectRef {
        kind: kind.to_string(),
        namespace: meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string(),
        name: meta.get("name")?.as_str()?.to_string(),
    })
}

fn typed<T: DeserializeOwned>(doc: &Value, r: &Option<ObjectRef>) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(doc.clone()).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        (r.clone(), field, e.into_inner().to_string())
    })
}

fn spec_err(r: &Option<ObjectRef>, e: FieldError) -> ObjectError {
    (r.clone(), Some(e.field), e.message)
}

fn parse_object(doc: &Value) -> Result<Option<(ObjectRef, Object)>, ObjectError> {
    let kind = doc.get("kind").and_then(Value::as_str);
    let api_version = doc.get("apiVersion").and_then(Value::as_str);
    let (Some(kind), Some(api_version)) = (kind, api_version) else {
        return Err((
            None,
            None,
            "not a Kubernetes object: apiVersion and kind are required".into(),
        ));
    };
    let r = object_ref(doc, kind);
    let obj = match (api_version, kind) {
        ("v1", "Service") => {
            let s = ServiceSpec::from_k8s(&typed::<Service>(doc, &r)?).map_err(|e| spec_err(&r, e))?;
            super::warn_ignored("Service", &s.namespace, &s.name, &s.ignored);
            Object::Service(s)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match SliceSpec::from_k8s(&typed::<EndpointSlice>(doc, &r)?).map_err(|e| spec_err(&r, e))? {
                Some(s) => {
                    super::warn_ignored("EndpointSlice", &s.namespace, &s.name, &s.ignored);
                    Object::Slice(s)
                }
                None => {
                    debug!(
                        ?r,
                        "EndpointSlice without service-name label or with FQDN addresses ignored"
                    );
                    return Ok(None);
                }
            }
        }
        ("v1", "Node") => {
            let n = NodeSpec::from_k8s(&typed::<Node>(doc, &r)?).map_err(|e| spec_err(&r, e))?;
            super::warn_ignored("Node", "", &n.name, &n.ignored);
            Object::Node(n)
        }
        _ => {
            debug!(api_version, kind, "ignoring object of a kind the proxy does not use");
            return Ok(None);
        }
    };
    let r = r.ok_or_else(|| (None, Some("metadata.name".to_string()), "missing".to_string()))?;
    Ok(Some((r, obj)))
}

/// Reads the manifests now and after every change under the path, and
/// keeps `state` equal to what they say. Errors are logged per document.
/// How long a file named by an event but missing stays in force: a file
/// replaced by delete-then-create (some editors) is back well within it.
const MISSING_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Keeps `state` current from the manifests: everything at start, then
/// only the files a burst of watch events names; everything again when
/// events were lost and every `rescan_every`. Reading and parsing run on a
/// blocking thread, so a long initial parse (100,000 files) never stalls
/// the agent's event loop (SIGTERM stays prompt).
pub async fn run(
    source: ManifestSource,
    state: std::sync::Arc<super::SourceState>,
    debounce: std::time::Duration,
    rescan_every: std::time::Duration,
) {
    use tokio::time::{Instant, sleep_until};
    let watch = source.watch();
    let path = source.path().to_path_buf();
    let mut source = Some(source);
    let (_watcher, mut changes) = match watch {
        Ok(w) => (Some(w.0), Some(w.1)),
        Err(e) => {
            tracing::error!("cannot watch {}: {e:#}; changes will not be seen", path.display());
            (None, None)
        }
    };
    let mut work = Work::Everything;
    let mut missing: BTreeSet<PathBuf> = BTreeSet::new();
    let mut recheck_at: Option<Instant> = None;
    let mut next_rescan = Instant::now() + rescan_every;
    loop {
        let Some(mut src) = source.take() else { return };
        let job = std::mem::replace(&mut work, Work::Nothing);
        let (src, published, gone) = match tokio::task::spawn_blocking(move || {
            let outcome = job.run(&mut src);
            (src, outcome)
        })
        .await
        {
            Ok((src, (published, gone))) => (src, published, gone),
            Err(e) => {
                tracing::error!("manifests reader failed: {e}; changes will not be seen");
                return;
            }
        };
        source = Some(src);
        if let Some((snapshot, errors)) = published {
            for e in &errors {
                tracing::error!("invalid manifest: {e}");
            }
            let generation = state.replace_all(snapshot);
            tracing::info!(generation, errors = errors.len(), "manifests read");
        }
        if !gone.is_empty() {
            missing.extend(gone);
            recheck_at.get_or_insert_with(|| Instant::now() + MISSING_GRACE);
        }
        // Wait for the next piece of work.
        let Some(rx) = changes.as_mut() else {
            // No watch: only the periodic rescan.
            sleep_until(next_rescan).await;
            next_rescan = Instant::now() + rescan_every;
            work = Work::Everything;
            continue;
        };
        work = tokio::select! {
            event = rx.recv() => {
                let Some(first) = event else { return };
                // Let a burst of writes finish, then read once.
                tokio::time::sleep(debounce).await;
                let mut burst = vec![first];
                while let Ok(e) = rx.try_recv() {
                    burst.push(e);
                }
                Work::from_events(burst)
            }
            () = sleep_until(recheck_at.unwrap_or_else(Instant::now)), if recheck_at.is_some() => {
                recheck_at = None;
                Work::ForgetIfGone(std::mem::take(&mut missing))
            }
            () = sleep_until(next_rescan) => {
                next_rescan = Instant::now() + rescan_every;
                Work::Everything
            }
        };
    }
}

/// What the reader does next.
enum Work {
    Nothing,
    Everything,
    Paths(BTreeSet<PathBuf>),
    ForgetIfGone(BTreeSet<PathBuf>),
}

type Published = Option<(Snapshot, Vec<ManifestError>)>;

impl Work {
    fn from_events(events: Vec<WatchEvent>) -> Self {
        let mut paths = BTreeSet::new();
        for e in events {
            match e {
                WatchEvent::Rescan => return Work::Everything,
                WatchEvent::Paths(p) => paths.extend(p),
            }
        }
        Work::Paths(paths)
    }

    /// Does the work; returns what to publish (if anything changed) and
    /// the paths found missing.
    fn run(self, source: &mut ManifestSource) -> (Published, BTreeSet<PathBuf>) {
        match self {
            Work::Nothing => (None, BTreeSet::new()),
            Work::Everything => (Some(source.load()), BTreeSet::new()),
            Work::Paths(paths) => {
                let (snapshot, errors, missing) = source.load_paths(&paths);
                (Some((snapshot, errors)), missing)
            }
            Work::ForgetIfGone(paths) => {
                let (changed, errors) = source.forget_if_gone(&paths);
                (
                    (changed || !errors.is_empty()).then(|| (source.snapshot(), errors)),
                    BTreeSet::new(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: net-test}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: net-test}
spec:
  clusterIP: 198.19.0.10
  ports: [{port: 8080, targetPort: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: net-test
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints:
  - addresses: [198.18.1.11]
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lb-manifests-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn a_watched_file_ignores_its_neighbours_and_sees_its_own_changes() {
        use std::time::Duration;
        let dir = tempdir();
        let file = write(&dir, "a.yaml", GOOD);
        let (_watcher, mut changes) = ManifestSource::new(&file).watch().unwrap();
        // A log beside the manifest, written all the time, must not make the
        // agent re-read the manifest (it did: a read loop for big files).
        write(&dir, "agent.log", "line\n");
        let neighbour = tokio::time::timeout(Duration::from_millis(300), changes.recv()).await;
        assert!(neighbour.is_err(), "a neighbour's change was taken for the manifest's");
        write(&dir, "a.yaml", GOOD);
        let own = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert!(
            matches!(&own, Ok(Some(WatchEvent::Paths(p))) if p.contains(&file)),
            "the manifest's own change: {own:?}"
        );
    }

    /// A file replaced by rename is never a deletion; a file that goes is
    /// dropped only once it is still gone after the grace period; only the
    /// named files are read.
    #[test]
    fn named_paths_are_read_and_missing_ones_dropped_only_when_still_gone() {
        let dir = tempdir();
        let web = write(&dir, "web.yaml", GOOD);
        let other = write(
            &dir,
            "other.yaml",
            &GOOD
                .replace("name: web", "name: db")
                .replace("198.19.0.10", "198.19.0.11"),
        );
        let mut source = ManifestSource::new(&dir);
        let (snap, errors) = source.load();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.services.len(), 2);

        // Atomic replace: write a temporary file, rename it over web.yaml.
        let tmp = write(&dir, ".web.yaml.tmp", &GOOD.replace("198.18.1.11", "198.18.1.12"));
        std::fs::rename(&tmp, &web).unwrap();
        // other.yaml is unreadable now: a full read would report it, a
        // read of the named paths does not touch it.
        std::fs::write(&other, "{ not yaml").unwrap();
        let (snap, errors, missing) = source.load_paths(&BTreeSet::from([tmp.clone(), web.clone()]));
        assert!(errors.is_empty() && missing.is_empty(), "{errors:?} {missing:?}");
        assert_eq!(snap.services.len(), 2, "nothing vanished");
        let slice = snap.slices.iter().find(|s| s.service_name == "web").unwrap();
        assert_eq!(slice.endpoints[0].address.to_string(), "198.18.1.12", "the new content");

        // Deleted, then back before the grace ran out: kept, re-read.
        std::fs::remove_file(&web).unwrap();
        let (snap, _, missing) = source.load_paths(&BTreeSet::from([web.clone()]));
        assert_eq!(missing, BTreeSet::from([web.clone()]));
        assert_eq!(snap.services.len(), 2, "a missing file stays in force for now");
        write(&dir, "web.yaml", GOOD);
        let (changed, _) = source.forget_if_gone(&missing);
        assert!(changed, "re-read");
        assert_eq!(source.snapshot().services.len(), 2);

        // Deleted for good: dropped after the grace.
        std::fs::remove_file(&web).unwrap();
        let (_, _, missing) = source.load_paths(&BTreeSet::from([web.clone()]));
        let (changed, _) = source.forget_if_gone(&missing);
        assert!(changed);
        let snap = source.snapshot();
        assert_eq!(snap.services.len(), 1, "{:?}", snap.services);
    }

    #[test]
    fn reads_services_and_slices_and_ignores_other_kinds() {
        let dir = tempdir();
        write(&dir, "a.yaml", GOOD);
        let (snap, errors) = ManifestSource::new(&dir).load();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.slices.len(), 1);
        assert_eq!(snap.slices[0].endpoints.len(), 1);
    }

    #[test]
    fn bad_document_names_file_document_and_field_and_keeps_last_good() {
        let dir = tempdir();
        let file = write(&dir, "a.yaml", GOOD);
        let mut src = ManifestSource::new(&file);
        assert!(src.load().1.is_empty());

        write(
            &dir,
            "a.yaml",
            &GOOD.replace("[{port: 8080, targetPort: 80}]", "[{port: eighty}]"),
        );
        let (snap, errors) = src.load();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(e.document, 2);
        assert_eq!(e.field.as_deref(), Some("spec.ports[0].port"));
        assert_eq!(e.object.as_deref(), Some("Service net-test/web"));
        let text = e.to_string();
        assert!(
            text.contains("a.yaml: document 2 (Service net-test/web): field spec.ports[0].port"),
            "{text}"
        );
        // The previous version of the service still stands.
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.services[0].ports[0].port, 8080);
    }

    #[test]
    fn semantic_error_is_reported_with_field() {
        let dir = tempdir();
        write(
            &dir,
            "a.yaml",
            &GOOD.replace("addresses: [198.18.1.11]", "addresses: [not-an-ip]"),
        );
        let (snap, errors) = ManifestSource::new(&dir).load();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field.as_deref(), Some("endpoints[0].addresses[0]"));
        assert_eq!(snap.services.len(), 1, "the valid service is still read");
        assert!(snap.slices.is_empty());
    }

    #[test]
    fn yaml_syntax_error_keeps_the_files_previous_objects() {
        let dir = tempdir();
        write(&dir, "a.yaml", GOOD);
        let mut src = ManifestSource::new(&dir);
        src.load();
        write(&dir, "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        let (snap, errors) = src.load();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("YAML syntax"), "{}", errors[0]);
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.slices.len(), 1);
    }

    #[test]
    fn list_documents_are_flattened() {
        let dir = tempdir();
        let list = "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Service\n    metadata: {name: a}\n    spec: {clusterIP: 198.19.0.1, ports: [{port: 80}]}\n";
        write(&dir, "l.yml", list);
        let (snap, errors) = ManifestSource::new(&dir).load();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.services[0].namespace, "default");
    }

    #[test]
    fn malformed_objects_are_each_rejected_naming_object_and_field() {
        let svc = |spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: net-test}}\nspec:\n  clusterIP: 198.19.0.50\n{spec}"
            )
        };
        let slice = |body: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: bad-x, namespace: net-test, labels: {{kubernetes.io/service-name: bad}}}}\naddressType: IPv4\n{body}"
            )
        };
        let cases = [
            ("missing ports", svc(""), "spec.ports"),
            ("port 0", svc("  ports: [{port: 0}]\n"), "spec.ports[0].port"),
            ("huge port", svc("  ports: [{port: 99999999999}]\n"), "spec.ports[0].port"),
            ("port not a number", svc("  ports: [{port: http}]\n"), "spec.ports[0].port"),
            ("unknown protocol", svc("  ports: [{port: 80, protocol: QUIC}]\n"), "spec.ports[0].protocol"),
            ("duplicate port names", svc("  ports: [{name: a, port: 80}, {name: a, port: 81}]\n"), "spec.ports[1].name"),
            ("bad targetPort", svc("  ports: [{port: 80, targetPort: 0}]\n"), "spec.ports[0].targetPort"),
            ("bad cluster IP", "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: net-test}\nspec:\n  clusterIP: 198.19.0.500\n  ports: [{port: 80}]\n".to_string(), "spec.clusterIP"),
            ("bad endpoint address", slice("endpoints: [{addresses: [10.0.0.256]}]\n"), "endpoints[0].addresses[0]"),
            ("endpoint of the wrong family", slice("endpoints: [{addresses: [\"fd00::1\"]}]\n"), "endpoints[0].addresses[0]"),
            // (A slice port out of range is ignored, not the slice: see
            // model::tests::slice_ports_without_a_valid_number_are_ignored_not_the_slice.)
        ];
        for (what, yaml, field) in cases {
            let dir = tempdir();
            // The good example beside the bad object, in the same file.
            write(&dir, "a.yaml", &format!("{GOOD}---\n{yaml}"));
            let (snap, errors) = ManifestSource::new(&dir).load();
            assert_eq!(errors.len(), 1, "{what}: {errors:?}");
            let e = &errors[0];
            assert_eq!(e.field.as_deref(), Some(field), "{what}: {e}");
            assert!(
                e.object
                    .as_deref()
                    .is_some_and(|o| o.ends_with("net-test/bad") || o.ends_with("net-test/bad-x")),
                "{what}: {e}"
            );
            assert_eq!(e.document, 4, "{what}: {e}");
            // Every other object is still read.
            assert!(
                snap.services.iter().any(|s| s.name == "web"),
                "{what}: the good service is gone"
            );
            assert!(snap.slices.iter().any(|s| s.name == "web-1"), "{what}");
        }
    }
}
