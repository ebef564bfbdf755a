//! The real `lb-agent` binary, started inside the node namespace. Its log
//! is collected so tests wait on what it reports, not on the clock.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cleanup;
use crate::netns::Netns;
use crate::sandbox::{NODE_NAME, Sandbox};

/// Where the agent binary is: $LB_AGENT_BIN, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("LB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent"))
}

type Log = Arc<(Mutex<Vec<String>>, Condvar)>;

pub struct Agent {
    child: Child,
    log: Log,
    bpf_root: PathBuf,
}

impl Agent {
    /// Starts the agent on the sandbox's manifests and waits until it has
    /// done its first sync and attached ("ready").
    pub fn start(sandbox: &Sandbox, echo: bool) -> anyhow::Result<Self> {
        Self::start_with(
            sandbox,
            &[OsStr::new("--manifests"), sandbox.manifests_dir.as_os_str()],
            echo,
        )
    }

    /// Starts the agent on a (fake) API server described by `kubeconfig`.
    pub fn start_kube(sandbox: &Sandbox, kubeconfig: &Path, echo: bool) -> anyhow::Result<Self> {
        Self::start_with(sandbox, &[OsStr::new("--kubeconfig"), kubeconfig.as_os_str()], echo)
    }

    /// Starts `lb-agent run` with the sandbox's node name and bpf root plus
    /// `source_args`, and waits until it is ready.
    pub fn start_with(sandbox: &Sandbox, source_args: &[&OsStr], echo: bool) -> anyhow::Result<Self> {
        Self::spawn(sandbox, source_args, echo)?.ready()
    }

    /// `start_with` with these environment variables set for the agent.
    pub fn start_with_env(
        sandbox: &Sandbox,
        args: &[&OsStr],
        envs: &[(&str, &str)],
        echo: bool,
    ) -> anyhow::Result<Self> {
        Self::spawn_in_with_env(&sandbox.node, NODE_NAME, &sandbox.bpf_root, args, envs, echo)?.ready()
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the agent has done its first sync and attached.
    pub fn ready(self) -> anyhow::Result<Self> {
        self.wait_for_log(0, " ready", Duration::from_secs(30))
            .context("waiting for lb-agent to become ready")?;
        Ok(self)
    }

    /// Starts `lb-agent run` without waiting for anything.
    pub fn spawn(sandbox: &Sandbox, source_args: &[&OsStr], echo: bool) -> anyhow::Result<Self> {
        Self::spawn_in(&sandbox.node, NODE_NAME, &sandbox.bpf_root, source_args, echo)
    }

    /// Starts `lb-agent run` in `node` as node `node_name` with its own
    /// bpf root and `args` (source and flags), without waiting.
    pub fn spawn_in(
        node: &Netns,
        node_name: &str,
        bpf_root: &Path,
        args: &[&OsStr],
        echo: bool,
    ) -> anyhow::Result<Self> {
        Self::spawn_in_with_env(node, node_name, bpf_root, args, &[], echo)
    }

    /// `spawn_in` with these environment variables set for the agent.
    pub fn spawn_in_with_env(
        node: &Netns,
        node_name: &str,
        bpf_root: &Path,
        args: &[&OsStr],
        envs: &[(&str, &str)],
        echo: bool,
    ) -> anyhow::Result<Self> {
        let bin = agent_bin();
        if !bin.exists() {
            bail!(
                "{} not found: build it first (cargo build -p lb-agent) or set LB_AGENT_BIN",
                bin.display()
            );
        }
        let mut child = node
            .command(bin.to_str().context("agent path is not UTF-8")?)
            .args(["run", "--node-name", node_name])
            .args(args)
            .arg("--bpf-root")
            .arg(bpf_root)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting lb-agent")?;
        cleanup::track_pid(child.id() as i32);
        let prefix = format!("[lb-agent {node_name}]");
        let log: Log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{prefix} {line}");
                }
                let (lines, cond) = &*sink;
                lines.lock().unwrap().push(line);
                cond.notify_all();
            }
            // EOF: the agent exited; wake waiters so they fail fast.
            let (lines, cond) = &*sink;
            lines.lock().unwrap().push("<exited>".into());
            cond.notify_all();
        });
        Ok(Agent {
            child,
            log,
            bpf_root: bpf_root.to_path_buf(),
        })
    }

    /// Number of log lines so far (a position for `wait_for_log`).
    pub fn log_position(&self) -> usize {
        self.log.0.lock().unwrap().len()
    }

    /// Waits for a log line after `from` containing `needle`; returns it.
    pub fn wait_for_log(&self, from: usize, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        self.wait_for_line(from, needle, |l| l.contains(needle), timeout)
    }

    /// Waits for a log line after `from` that satisfies `matches`.
    pub fn wait_for_line(
        &self,
        from: usize,
        what: &str,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let (lines, cond) = &*self.log;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(line) = guard.iter().skip(from).find(|l| matches(l)) {
                return Ok(line.clone());
            }
            if guard.last().is_some_and(|l| l == "<exited>") {
                bail!("lb-agent exited before logging {what:?}; log:\n{}", guard.join("\n"));
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("no log line {what:?} within {timeout:?}; log:\n{}", guard.join("\n"));
            }
            guard = cond.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    /// Waits until a manifest change made after log position `from` has
    /// been read and synced into the maps; returns the time it took.
    pub fn wait_manifest_synced(&self, from: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let read = self.wait_for_log(from, "manifests read", timeout)?;
        let generation = log_field(&read, "generation").context("manifests read without generation")?;
        self.wait_for_line(
            from,
            &format!("synced generation>={generation}"),
            |l| l.contains(" synced") && log_field(l, "generation").is_some_and(|g| g >= generation),
            timeout,
        )?;
        Ok(started.elapsed())
    }

    /// A datapath counter (`lb-agent stats`), e.g. ("event", "xdp_forwarded").
    pub fn counter(&self, kind: &str, name: &str) -> anyhow::Result<u64> {
        let out = crate::netns::run(
            std::process::Command::new(agent_bin())
                .args(["stats", "-o", "json", "--bpf-root"])
                .arg(&self.bpf_root),
        )?;
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        rows.iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
            .and_then(|r| r["packets"].as_u64())
            .with_context(|| format!("no {kind} counter {name} in `lb-agent stats`"))
    }

    /// What the kernel maps hold (`lb-agent services -o json`):
    /// frontend → backends.
    pub fn services(&self) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let (services, orphans) = self.services_and_orphans()?;
        if orphans > 0 {
            bail!("the maps hold {orphans} entries no service owns: {services:?}");
        }
        Ok(services)
    }

    /// The frontends and the number of orphaned entries (a sync in progress
    /// has some for a moment: new backends are written before the list that
    /// uses them).
    fn services_and_orphans(&self) -> anyhow::Result<(BTreeMap<String, Vec<String>>, u64)> {
        let out = crate::netns::run(
            std::process::Command::new(agent_bin())
                .args(["services", "-o", "json", "--bpf-root"])
                .arg(&self.bpf_root),
        )?;
        let view: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let orphans = view["orphan_slots"].as_u64().unwrap_or(0) + view["orphan_backends"].as_u64().unwrap_or(0);
        let mut services = BTreeMap::new();
        for s in view["services"].as_array().context("services array")? {
            let mut backends: Vec<String> = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b.as_str().map(String::from))
                .collect();
            backends.sort();
            services.insert(s["frontend"].as_str().unwrap_or_default().to_string(), backends);
        }
        Ok((services, orphans))
    }

    /// Waits until the maps satisfy `wanted`, re-checking whenever the agent
    /// logs something (it logs every sync). Returns the last view on timeout.
    pub fn wait_for_services(
        &self,
        wanted: impl Fn(&BTreeMap<String, Vec<String>>) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let deadline = Instant::now() + timeout;
        loop {
            let position = self.log_position();
            let (view, orphans) = self.services_and_orphans()?;
            if orphans == 0 && wanted(&view) {
                return Ok(view);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("maps never reached the wanted state within {timeout:?}; last: {view:#?}");
            }
            // Wake on the next log line (or re-check after a short while).
            let _ = self.wait_for_line(
                position,
                "any line",
                |_| true,
                (deadline - now).min(Duration::from_millis(200)),
            );
        }
    }

    pub fn log(&self) -> String {
        self.log.0.lock().unwrap().join("\n")
    }

    /// SIGTERM and wait: the agent detaches its programs and removes its pins.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.terminate()
    }

    /// SIGKILL: no chance to clean up anything.
    pub fn kill(mut self) -> anyhow::Result<()> {
        let pid = self.child.id() as i32;
        self.child.kill()?;
        self.child.wait()?;
        cleanup::untrack_pid(pid);
        Ok(())
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        // Its stderr closes when it exits: wait on that, then reap it.
        if self.wait_for_log(0, "<exited>", Duration::from_secs(10)).is_err() {
            let _ = self.child.kill();
        }
        let status = self.child.wait()?;
        cleanup::untrack_pid(pid);
        Ok(status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.terminate();
        }
    }
}

/// The number in a `key=123` field of a log line.
pub fn log_field(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[start..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
