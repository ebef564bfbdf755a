//! `lb-agent cleanup --cleanup-kube-proxy`: removes what kube-proxy left in
//! this network namespace so a node can switch over — the KUBE-* chains
//! (and the rules jumping to them) of iptables-legacy and iptables-nft in
//! the nat, filter and mangle tables, and the nftables `kube-proxy` tables.
//! Rules of others are left alone.

use std::process::Command;

use anyhow::{Context, bail};
use tracing::{info, warn};

const TABLES: [&str; 3] = ["nat", "filter", "mangle"];
/// (save command, iptables command) per backend.
const IPTABLES: [(&str, &str); 2] = [
    ("iptables-legacy-save", "iptables-legacy"),
    ("iptables-nft-save", "iptables-nft"),
];

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Splits an iptables-save rule into arguments; "quoted words" stay one.
fn split_rule(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    args.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        args.push(current);
    }
    args
}

/// Removes kube-proxy's chains from one iptables backend; returns how many
/// chains went.
fn clean_iptables(save: &str, iptables: &str) -> anyhow::Result<usize> {
    let mut removed = 0;
    for table in TABLES {
        let Ok(dump) = run(Command::new(save).args(["-t", table])) else {
            continue;
        };
        let chains: Vec<&str> = dump
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with("KUBE-"))
            .collect();
        // Rules elsewhere that jump into kube-proxy's chains.
        for line in dump.lines().filter(|l| l.starts_with("-A ")) {
            let mut words = line.split_whitespace().skip(1);
            let chain = words.next().unwrap_or_default();
            if chain.starts_with("KUBE-") || !line.contains(" -j KUBE-") {
                continue;
            }
            let rule = split_rule(line);
            run(Command::new(iptables).args(["-t", table, "-D"]).args(&rule[1..]))?;
        }
        for chain in &chains {
            run(Command::new(iptables).args(["-t", table, "-F", chain]))?;
        }
        for chain in &chains {
            run(Command::new(iptables).args(["-t", table, "-X", chain]))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// kube-proxy's nftables mode keeps everything in `kube-proxy` tables.
fn clean_nftables() -> anyhow::Result<usize> {
    let Ok(tables) = run(Command::new("nft").args(["list", "tables"])) else {
        return Ok(0);
    };
    let mut removed = 0;
    for line in tables.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family, "kube-proxy"] = words[..] {
            run(Command::new("nft").args(["delete", "table", family, "kube-proxy"]))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Cleans every backend (a backend whose tools are missing has nothing to
/// clean); fails, after trying them all, if any could not be cleaned.
pub fn cleanup() -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (save, iptables) in IPTABLES {
        match clean_iptables(save, iptables) {
            Ok(n) => info!(backend = iptables, chains = n, "removed kube-proxy chains"),
            Err(e) => {
                warn!(backend = iptables, "{e:#}");
                failed.push(format!("{iptables}: {e:#}"));
            }
        }
    }
    match clean_nftables() {
        Ok(n) => info!(tables = n, "removed kube-proxy nftables tables"),
        Err(e) => failed.push(format!("nft: {e:#}")),
    }
    if !failed.is_empty() {
        bail!("kube-proxy rules left in place: {}", failed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rules_split_like_a_shell() {
        let line = r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#;
        assert_eq!(
            super::split_rule(line),
            [
                "-A",
                "PREROUTING",
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES"
            ]
        );
    }
}
