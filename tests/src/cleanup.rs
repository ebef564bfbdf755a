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

/// Deletes sandboxes left behind by killed runs (names start with `prefix`).
pub fn sweep_stale(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(prefix) {
                let _ = Command::new("ip").args(["netns", "delete", name]).status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
