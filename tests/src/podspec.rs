//! Runs a pod template from the rendered `deploy/` manifests with podman,
//! as a kubelet would on a node: the same image, args and env (`$(VAR)`
//! expanded, fieldRef and configMapKeyRef resolved), the container's
//! capabilities and nothing more, its volumes and mounts (hostPath with
//! mount propagation, ConfigMaps as files), init containers first. A
//! hostNetwork pod joins the sandbox node's network namespace — never the
//! machine's. Containers are removed when the run is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::image::podman;

/// The documents `kubectl kustomize DIR` renders.
pub struct Rendered {
    pub docs: Vec<Value>,
}

impl Rendered {
    /// Renders a kustomize directory with kubectl's built-in kustomize.
    pub fn kustomize(dir: &std::path::Path) -> anyhow::Result<Self> {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .context("running kubectl kustomize (`cargo xtask setup` installs kubectl)")?;
        if !out.status.success() {
            bail!(
                "kubectl kustomize {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        let docs = text
            .split("\n---\n")
            .map(|d| serde_norway::from_str::<Value>(d).context("a rendered document"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Rendered { docs })
    }

    /// The object of `kind` whose name is `name` or, for generated
    /// ConfigMaps, `name-<hash>`.
    pub fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs.iter().find(|d| matches(d, kind, name))
    }

    pub fn find_mut(&mut self, kind: &str, name: &str) -> Option<&mut Value> {
        self.docs.iter_mut().find(|d| matches(d, kind, name))
    }

    /// A DaemonSet's pod template spec.
    pub fn pod_template(&self, daemonset: &str) -> anyhow::Result<&Value> {
        self.find("DaemonSet", daemonset)
            .map(|d| &d["spec"]["template"]["spec"])
            .with_context(|| format!("no DaemonSet {daemonset} in the rendered manifests"))
    }

    fn config_map_data(&self, name: &str) -> anyhow::Result<&serde_json::Map<String, Value>> {
        self.find("ConfigMap", name)
            .and_then(|c| c["data"].as_object())
            .with_context(|| format!("no ConfigMap {name} with data"))
    }
}

fn matches(doc: &Value, kind: &str, name: &str) -> bool {
    let n = doc["metadata"]["name"].as_str().unwrap_or_default();
    doc["kind"] == kind
        && (n == name
            || n.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|hash| !hash.is_empty() && !hash.contains('-')))
}

/// Where and how to run a pod.
pub struct PodRun<'a> {
    pub rendered: &'a Rendered,
    /// `metadata.name` stand-in; container names are `<pod>-<container>`.
    pub pod_name: String,
    /// The node (spec.nodeName) and its network namespace path.
    pub node_name: String,
    pub netns_path: String,
    /// Replaces every container's image (a locally built tag).
    pub image: Option<String>,
    /// Volumes left out, to show what happens without them.
    pub without_volumes: Vec<String>,
    started: Vec<String>,
    scratch: PathBuf,
}

impl<'a> PodRun<'a> {
    pub fn new(rendered: &'a Rendered, pod_name: &str, node_name: &str, netns_path: &str) -> Self {
        PodRun {
            rendered,
            pod_name: pod_name.to_string(),
            node_name: node_name.to_string(),
            netns_path: netns_path.to_string(),
            image: None,
            without_volumes: Vec::new(),
            started: Vec::new(),
            scratch: std::env::temp_dir().join(format!("{pod_name}-volumes")),
        }
    }

    /// Runs the init containers to completion, then starts the containers;
    /// returns the containers' podman names.
    pub fn start(&mut self, spec: &Value) -> anyhow::Result<Vec<String>> {
        if spec["hostNetwork"] != true {
            bail!("only hostNetwork pods run here (they join the node's namespace)");
        }
        for c in spec["initContainers"].as_array().into_iter().flatten() {
            let name = self.container_name(c)?;
            let args = self.podman_args(spec, c, &name, false)?;
            self.started.push(name.clone());
            podman(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .with_context(|| format!("init container {name}"))?;
        }
        let mut names = Vec::new();
        for c in spec["containers"].as_array().context("spec.containers")? {
            let name = self.container_name(c)?;
            let args = self.podman_args(spec, c, &name, true)?;
            self.started.push(name.clone());
            podman(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .with_context(|| format!("container {name}"))?;
            names.push(name);
        }
        Ok(names)
    }

    fn container_name(&self, c: &Value) -> anyhow::Result<String> {
        Ok(format!(
            "{}-{}",
            self.pod_name,
            c["name"].as_str().context("container without a name")?
        ))
    }

    /// The container's environment as the kubelet resolves it.
    fn env(&self, c: &Value) -> anyhow::Result<Vec<(String, String)>> {
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().context("env without a name")?.to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "spec.nodeName" => self.node_name.clone(),
                    "metadata.name" => self.pod_name.clone(),
                    other => bail!("env {name}: fieldRef {other} not supported here"),
                }
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                let (map, key) = (
                    r["name"].as_str().unwrap_or_default(),
                    r["key"].as_str().unwrap_or_default(),
                );
                self.rendered.config_map_data(map)?[key]
                    .as_str()
                    .with_context(|| format!("env {name}: ConfigMap {map} has no key {key}"))?
                    .to_string()
            } else {
                bail!("env {name}: unsupported value source {e}");
            };
            env.push((name, value));
        }
        Ok(env)
    }

    fn podman_args(&self, spec: &Value, c: &Value, name: &str, detach: bool) -> anyhow::Result<Vec<String>> {
        let env = self.env(c)?;
        let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut a: Vec<String> = vec!["run".into(), "--name".into(), name.into()];
        a.push(if detach { "--detach" } else { "--rm" }.into());
        a.extend(
            [
                "--network",
                &format!("ns:{}", self.netns_path),
                // A kubelet on cgroup v2 gives every container its own cgroup
                // namespace: run it so here too (podman's v1 default is the host's).
                "--cgroupns=private",
                // Kubernetes' default is Unconfined unless the pod asks for a profile.
                "--security-opt",
                "seccomp=unconfined",
                "--pull=never",
            ]
            .map(String::from),
        );
        // Explicit limits (podman 4.3 with runc here needs them), the
        // machine's own: a container may not raise them.
        for (flag, resource) in [("nofile", libc::RLIMIT_NOFILE), ("nproc", libc::RLIMIT_NPROC)] {
            let n = hard_limit(resource).min(16_384);
            a.push("--ulimit".into());
            a.push(format!("{flag}={n}:{n}"));
        }
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            a.push("--privileged".into());
        }
        for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
            a.push(format!("--cap-drop={}", cap.as_str().unwrap_or_default()));
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            a.push(format!("--cap-add={}", cap.as_str().unwrap_or_default()));
        }
        for (k, v) in &env {
            a.push("--env".into());
            a.push(format!("{k}={v}"));
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().context("volumeMount without a name")?;
            if self.without_volumes.iter().any(|w| w == vname) {
                continue;
            }
            let volume = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == vname)
                .with_context(|| format!("volumeMount {vname}: no such volume"))?;
            let source = self.volume_source(volume)?;
            let mut opts = Vec::new();
            if m["readOnly"] == true {
                opts.push("ro");
            }
            match m["mountPropagation"].as_str() {
                Some("HostToContainer") => opts.push("rslave"),
                Some("Bidirectional") => opts.push("rshared"),
                _ => {}
            }
            let target = m["mountPath"].as_str().context("mountPath")?;
            a.push("--volume".into());
            a.push(match opts.is_empty() {
                true => format!("{source}:{target}"),
                false => format!("{source}:{target}:{}", opts.join(",")),
            });
        }
        let expand = |s: &str| expand_vars(s, &vars);
        let command: Vec<String> = c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(expand)
            .collect();
        if let Some(entry) = command.first() {
            a.push(format!("--entrypoint={entry}"));
        }
        let image = match &self.image {
            Some(i) => i.clone(),
            None => c["image"].as_str().context("container without an image")?.to_string(),
        };
        a.push(image);
        a.extend(command.into_iter().skip(1));
        a.extend(
            c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(expand),
        );
        Ok(a)
    }

    /// A host path for the volume: hostPath as is, a ConfigMap's data as
    /// files, an emptyDir as a fresh directory.
    fn volume_source(&self, v: &Value) -> anyhow::Result<String> {
        let name = v["name"].as_str().unwrap_or_default();
        if let Some(path) = v["hostPath"]["path"].as_str() {
            match v["hostPath"]["type"].as_str() {
                Some("DirectoryOrCreate") => std::fs::create_dir_all(path)?,
                Some("FileOrCreate") if !Path::new(path).exists() => std::fs::write(path, "")?,
                _ => {}
            }
            return Ok(path.to_string());
        }
        let dir = self.scratch.join(name);
        std::fs::create_dir_all(&dir)?;
        if let Some(map) = v["configMap"]["name"].as_str() {
            for (file, content) in self.rendered.config_map_data(map)? {
                std::fs::write(dir.join(file), content.as_str().unwrap_or_default())?;
            }
        } else if v.get("emptyDir").is_none() {
            bail!("volume {name}: only hostPath, configMap and emptyDir are supported here");
        }
        Ok(dir.to_str().context("UTF-8 path")?.to_string())
    }

    /// Logs of a container (stdout and stderr).
    pub fn logs(&self, container: &str) -> String {
        Command::new("podman")
            .args(crate::image::PODMAN_GLOBAL)
            .args(["logs", container])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
            .unwrap_or_default()
    }

    /// Is the container running?
    pub fn running(&self, container: &str) -> bool {
        podman(&["inspect", "--format", "{{.State.Running}}", container]).is_ok_and(|s| s.trim() == "true")
    }
}

impl Drop for PodRun<'_> {
    fn drop(&mut self) {
        for name in self.started.iter().rev() {
            let _ = podman(&["rm", "--force", "--time", "5", name]);
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// This process's hard limit of `resource`.
fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a struct we own.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_max
}

/// `$(VAR)` references replaced as the kubelet does (unknown ones stay).
pub fn expand_vars(s: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if vars.contains_key(&after[..end]) => {
                out.push_str(vars[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_style_variable_expansion() {
        let vars = BTreeMap::from([("NODE_NAME", "node-1"), ("API", "https://a:6443")]);
        assert_eq!(
            expand_vars("--hostname-override=$(NODE_NAME)", &vars),
            "--hostname-override=node-1"
        );
        assert_eq!(expand_vars("$(API)/x$(NODE_NAME)", &vars), "https://a:6443/xnode-1");
        assert_eq!(expand_vars("$(UNSET) $(", &vars), "$(UNSET) $(");
    }

    #[test]
    fn generated_config_maps_are_found_by_their_base_name() {
        let doc = |name: &str| serde_json::json!({"kind": "ConfigMap", "metadata": {"name": name}});
        assert!(matches(&doc("lb-agent-ktcg98649k"), "ConfigMap", "lb-agent"));
        assert!(!matches(&doc("lb-agent-params-gmf2h6kmdt"), "ConfigMap", "lb-agent"));
        assert!(matches(
            &doc("lb-agent-params-gmf2h6kmdt"),
            "ConfigMap",
            "lb-agent-params"
        ));
    }
}
