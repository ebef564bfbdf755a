//! What to remove if the process is interrupted before guards run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    pids: Vec<i32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    f(&mut REGISTRY.lock().unwrap_or_else(|e| e.into_inner()))
}

pub fn track_namespace(name: &str) {
    with(|r| r.namespaces.push(name.to_string()));
}
pub fn untrack_namespace(name: &str) {
    with(|r| r.namespaces.retain(|n| n != name));
}
pub fn track_pid(pid: i32) {
    with(|r| r.pids.push(pid));
}
pub fn untrack_pid(pid: i32) {
    with(|r| r.pids.retain(|p| *p != pid));
}
pub fn track_dir(dir: PathBuf) {
    with(|r| r.dirs.push(dir));
}
pub fn untrack_dir(dir: &PathBuf) {
    with(|r| r.dirs.retain(|d| d != dir));
}

/// Removes everything still registered: agents first (SIGTERM lets them
/// detach and unpin), then namespaces and directories.
pub fn run_now() {
    let (pids, namespaces, dirs) = with(|r| {
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.namespaces),
            std::mem::take(&mut r.dirs),
        )
    });
    for pid in &pids {
        // SAFETY: plain kill(2) on a child we started.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    for pid in &pids {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(*pid, &mut status, 0) };
    }
    for ns in namespaces {
        let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// On Ctrl-C/SIGTERM: clean up, then exit 130.
pub fn on_interrupt() {
    let _ = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up the sandbox");
        run_now();
        std::process::exit(130);
    });
}

/// Deletes sandboxes left behind by killed runs (names start with `prefix`
/// followed by the pid of the process that made them, `lbt-PID-…`).
/// Sandboxes of processes still alive are left alone, so two test runs on
/// one machine do not tear down each other's namespaces.
pub fn sweep_stale(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if is_stale(name, prefix) {
                let _ = Command::new("ip").args(["netns", "delete", name]).status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            if is_stale(&e.file_name().to_string_lossy(), prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Is `name` a sandbox of ours (`prefix` + pid) whose process is gone?
/// Names without a pid are stale by definition.
fn is_stale(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
    pid.is_empty() || !std::path::Path::new("/proc").join(&pid).exists()
}

#[cfg(test)]
mod tests {
    use super::is_stale;

    #[test]
    fn only_sandboxes_of_dead_processes_are_stale() {
        let me = std::process::id();
        assert!(!is_stale(&format!("lbt-{me}-c3-node-1"), "lbt-"));
        assert!(!is_stale("other-123", "lbt-"));
        assert!(is_stale("lbt-x-node", "lbt-"));
        // pid_max is at most 2^22: this pid cannot exist.
        assert!(is_stale("lbt-99999999-c0-net", "lbt-"));
    }
}
