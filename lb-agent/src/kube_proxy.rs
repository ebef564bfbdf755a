//! `lb-agent cleanup --cleanup-kube-proxy`: removes what kube-proxy left in
//! this network namespace so a node can switch over, like
//! `kube-proxy --cleanup`: kube-proxy's own iptables chains (and the rules
//! jumping to them) in the nat, filter and mangle tables of both families
//! (iptables and ip6tables) and both backends (legacy and nft), and the
//! nftables `kube-proxy` tables. kubelet's chains (KUBE-FIREWALL,
//! KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT, KUBE-MARK-DROP) and rules of
//! others are left alone. Each table is changed in one `*-restore --noflush`
//! transaction that waits for the xtables lock.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use tracing::{debug, info, warn};

const TABLES: [&str; 3] = ["nat", "filter", "mangle"];
/// (save, restore) per family and backend.
const IPTABLES: [(&str, &str); 4] = [
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];
/// How long a restore waits for another writer's xtables lock (kube-proxy's
/// own value).
const LOCK_WAIT_SECONDS: &str = "5";

/// Chains that kube-proxy (iptables and ipvs modes) creates under fixed names.
const KUBE_PROXY_CHAINS: [&str; 13] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-MARK-MASQ",
    // ipvs mode
    "KUBE-LOAD-BALANCER",
    "KUBE-NODE-PORT",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];
/// Per-service and per-endpoint chains (a hash follows the prefix).
const KUBE_PROXY_CHAIN_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];

/// Whether kube-proxy owns `chain` (kubelet's KUBE-* chains are not).
fn is_kube_proxy_chain(chain: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&chain) || KUBE_PROXY_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// Runs `cmd` with `input` on stdin; returns its stdout.
fn run(cmd: &mut Command, input: Option<&str>) -> anyhow::Result<String> {
    let mut child = cmd
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    if let Some(input) = input {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output().with_context(|| format!("running {cmd:?}"))?;
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

/// The removal of kube-proxy's chains from one table, as `*-restore
/// --noflush` input.
#[derive(Debug, PartialEq)]
struct Removal {
    script: String,
    chains: usize,
    jumps: usize,
}

/// Plans the removal from `table`'s part of an iptables-save dump (None when
/// kube-proxy has nothing there): the rules of other chains that jump into
/// kube-proxy's chains are deleted (`-D` with the saved rule verbatim), then
/// kube-proxy's chains are flushed (`:CHAIN`) and deleted (`-X`), all in one
/// COMMIT so the table changes at once or not at all.
fn plan_removal(table: &str, dump: &str) -> Option<Removal> {
    let mut in_table = false;
    let mut chains = Vec::new();
    let mut jumps = Vec::new();
    for line in dump.lines() {
        if let Some(name) = line.strip_prefix('*') {
            in_table = name.trim() == table;
        } else if !in_table {
        } else if let Some(declaration) = line.strip_prefix(':') {
            chains.extend(declaration.split_whitespace().next().filter(|c| is_kube_proxy_chain(c)));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let args = split_rule(rule);
            let from_other_chain = args.first().is_some_and(|c| !is_kube_proxy_chain(c));
            let jumps_into_ours = args
                .windows(2)
                .any(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto") && is_kube_proxy_chain(&w[1]));
            if from_other_chain && jumps_into_ours {
                jumps.push(rule);
            }
        }
    }
    if chains.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut script = format!("*{table}\n");
    for chain in &chains {
        script.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in &jumps {
        script.push_str(&format!("-D {rule}\n"));
    }
    for chain in &chains {
        script.push_str(&format!("-X {chain}\n"));
    }
    script.push_str("COMMIT\n");
    Some(Removal {
        script,
        chains: chains.len(),
        jumps: jumps.len(),
    })
}

/// Removes kube-proxy's chains from one family of one iptables backend;
/// returns how many chains went (0 when the backend's tools are missing).
fn clean_iptables(save: &str, restore: &str) -> anyhow::Result<usize> {
    let mut removed = 0;
    for table in TABLES {
        let dump = match run(Command::new(save).args(["-t", table]), None) {
            Ok(dump) => dump,
            Err(e) => {
                // No tool, or the table does not exist here: nothing of kube-proxy's.
                debug!(backend = save, table, "not cleaned: {e:#}");
                continue;
            }
        };
        let Some(removal) = plan_removal(table, &dump) else {
            continue;
        };
        run(
            Command::new(restore).args(["--noflush", &format!("--wait={LOCK_WAIT_SECONDS}")]),
            Some(&removal.script),
        )
        .with_context(|| format!("table {table}"))?;
        info!(
            backend = restore,
            table,
            chains = removal.chains,
            jumps = removal.jumps,
            "removed kube-proxy chains"
        );
        removed += removal.chains;
    }
    Ok(removed)
}

/// kube-proxy's nftables mode keeps everything in `kube-proxy` tables (ip
/// and ip6); each goes in one transaction.
fn clean_nftables() -> anyhow::Result<usize> {
    let tables = match run(Command::new("nft").args(["list", "tables"]), None) {
        Ok(tables) => tables,
        Err(e) => {
            debug!("nftables not cleaned: {e:#}");
            return Ok(0);
        }
    };
    let mut removed = 0;
    for line in tables.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family, "kube-proxy"] = words[..] {
            run(
                Command::new("nft").args(["delete", "table", family, "kube-proxy"]),
                None,
            )?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The dummy interface kube-proxy's ipvs mode binds service addresses to.
const IPVS_INTERFACE: &str = "kube-ipvs0";

/// kube-proxy's ipvs mode: its dummy interface, and the IPVS virtual servers
/// (only when the kernel has IPVS at all; they are cleared with ipvsadm).
async fn clean_ipvs() -> anyhow::Result<()> {
    let interfaces = crate::datapath::attach::list_interfaces().await?;
    if let Some(dummy) = interfaces.iter().find(|i| i.name == IPVS_INTERFACE) {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        let task = tokio::spawn(conn);
        let deleted = handle.link().del(dummy.index).execute().await;
        task.abort();
        deleted.with_context(|| format!("deleting {IPVS_INTERFACE}"))?;
        info!(interface = IPVS_INTERFACE, "removed kube-proxy's ipvs interface");
    }
    let Ok(virtual_servers) = std::fs::read_to_string("/proc/net/ip_vs") else {
        debug!("no IPVS in this kernel: no IPVS state to clean");
        return Ok(());
    };
    // A header of three lines, then one line per virtual server or real server.
    if virtual_servers.lines().count() > 3 {
        run(Command::new("ipvsadm").arg("--clear"), None).context("clearing IPVS virtual servers")?;
        info!("cleared IPVS virtual servers");
    }
    Ok(())
}

/// Cleans every backend and family (a backend whose tools are missing has
/// nothing to clean); fails, after trying them all, if any could not be
/// cleaned. A second run finds nothing and changes nothing.
pub async fn cleanup() -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (save, restore) in IPTABLES {
        match clean_iptables(save, restore) {
            Ok(n) => debug!(backend = restore, chains = n, "kube-proxy chains removed"),
            Err(e) => {
                warn!(backend = restore, "{e:#}");
                failed.push(format!("{restore}: {e:#}"));
            }
        }
    }
    match clean_nftables() {
        Ok(n) => info!(tables = n, "removed kube-proxy nftables tables"),
        Err(e) => failed.push(format!("nft: {e:#}")),
    }
    if let Err(e) = clean_ipvs().await {
        failed.push(format!("ipvs: {e:#}"));
    }
    if !failed.is_empty() {
        bail!("kube-proxy rules left in place: {}", failed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Removal, plan_removal};

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

    #[test]
    fn only_kube_proxy_chains_and_the_jumps_into_them_are_removed() {
        let dump = r#"*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp --dport 22 -j ACCEPT
-A KUBE-SERVICES -j KUBE-SVC-ABC
-A KUBE-FIREWALL -j DROP
COMMIT
"#;
        let expected = r#"*filter
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
-D INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-X KUBE-PROXY-CANARY
-X KUBE-SERVICES
-X KUBE-SVC-ABC
COMMIT
"#;
        assert_eq!(
            plan_removal("filter", dump),
            Some(Removal {
                script: expected.into(),
                chains: 3,
                jumps: 1
            })
        );
        assert_eq!(plan_removal("nat", dump), None, "another table's part");
    }

    #[test]
    fn gotos_and_jumps_from_others_chains_go_too() {
        let dump = "*nat\n:MY-CHAIN - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
                    -A MY-CHAIN -s 198.18.0.0/16 -g KUBE-MARK-MASQ\n\
                    -A MY-CHAIN -j KUBE-MARK-DROP\nCOMMIT\n";
        let removal = plan_removal("nat", dump).unwrap();
        assert_eq!(
            removal.script,
            "*nat\n:KUBE-MARK-MASQ - [0:0]\n-D MY-CHAIN -s 198.18.0.0/16 -g KUBE-MARK-MASQ\n-X KUBE-MARK-MASQ\nCOMMIT\n"
        );
    }

    #[test]
    fn kubelets_chains_alone_need_no_change() {
        let dump = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        assert_eq!(plan_removal("mangle", dump), None);
    }
}
