//! Removing what an agent pinned under its bpf root (`lb-agent cleanup`,
//! `--cleanup-on-exit`): the maps, the links directory (unpinning a link
//! detaches its program), the layout records and maps left mid-migration,
//! then the root itself. Works on
//! a half-removed tree (what is already gone is not an error) and leaves
//! alone what is not the agent's, reporting it.

use std::path::{Path, PathBuf};

use lb_common::map_names;

use super::attach::LINK_DIR;

/// What could not be removed, with why.
#[derive(Debug, Default)]
pub struct Leftovers(pub Vec<(PathBuf, String)>);

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (path, why)) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{}: {why}", path.display())?;
        }
        Ok(())
    }
}

/// Names the agent creates directly under its bpf root.
fn is_agents(name: &str) -> bool {
    map_names::ALL.contains(&name)
        || name == LINK_DIR
        || name == super::migrate::MIGRATE_DIR
        || name == super::migrate::LAYOUT_DIR
        || name.starts_with("layout-")
}

/// Removes the agent's pins under `root`; returns what is left (empty when
/// `root` is gone or never existed).
pub fn remove_pin_tree(root: &Path) -> Leftovers {
    let mut left = Leftovers::default();
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return left,
        Err(e) => {
            left.0.push((root.to_path_buf(), e.to_string()));
            return left;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_agents(&name) {
            left.0.push((path, "not the agent's: left in place".into()));
            continue;
        }
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            // The links directory holds only the agent's link pins.
            gone(std::fs::remove_dir_all(&path))
        } else {
            gone(std::fs::remove_file(&path))
        };
        if let Err(e) = removed {
            left.0.push((path, e.to_string()));
        }
    }
    if left.is_empty()
        && let Err(e) = gone(std::fs::remove_dir(root))
    {
        left.0.push((root.to_path_buf(), e.to_string()));
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_agents_names_are_removed() {
        for name in ["SERVICES", "CONNTRACK", "links", "layout-0123456789abcdef"] {
            assert!(is_agents(name), "{name}");
        }
        for name in ["cilium", "SERVICES.old", "tc"] {
            assert!(!is_agents(name), "{name}");
        }
    }

    #[test]
    fn a_missing_root_leaves_nothing() {
        assert!(remove_pin_tree(Path::new("/nonexistent/lb-agent-pins")).is_empty());
    }
}
