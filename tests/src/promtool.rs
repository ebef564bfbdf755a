//! Prometheus' promtool (Debian's `prometheus` package, which `cargo xtask
//! setup` installs): checks of our /metrics exposition and PromQL. Local
//! files only, no network.

use std::io::Write;
use std::process::{Command, Stdio};

/// kube-proxy's own name for this gauge ends in `_total`: kept for its
/// dashboards, so promtool's lint about it is expected.
const KNOWN_LINT: &str =
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total non-counter metrics should not have \"_total\" suffix";

/// Runs promtool with `args` and `stdin`; (success, stdout + stderr).
/// Panics, naming the fix, when promtool is missing.
pub fn run(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("running promtool: {e}; `cargo xtask setup` installs it (Debian package prometheus)")
        });
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("waiting for promtool");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// `promtool check metrics` on an exposition: Ok, or what promtool found
/// (parse errors and every lint but kube-proxy's own naming).
pub fn check_metrics(exposition: &str) -> Result<(), String> {
    let (ok, out) = run(&["check", "metrics"], exposition);
    let problems: Vec<&str> = out.lines().filter(|l| !l.is_empty() && *l != KNOWN_LINT).collect();
    if problems.is_empty() && (ok || out.contains(KNOWN_LINT)) {
        Ok(())
    } else {
        Err(out)
    }
}
