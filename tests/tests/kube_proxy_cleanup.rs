//! `lb-agent cleanup --cleanup-kube-proxy` removes kube-proxy's chains and
//! tables like `kube-proxy --cleanup` — iptables and ip6tables, legacy and
//! nft backends, the nftables `kube-proxy` tables, ipvs mode's kube-ipvs0 — from a node namespace
//! holding rules as kube-proxy and kubelet really write them, keeps kubelet's
//! chains and everybody else's rules, and changes nothing on a second run.

use lb_tests::netns::{Netns, run};

/// iptables-save text of a node with kube-proxy (iptables mode), kubelet and
/// somebody else's rules, per family.
const IPV4_RULES: &str = include_str!("fixtures/kube-proxy-iptables-v4.save");
const IPV6_RULES: &str = include_str!("fixtures/kube-proxy-iptables-v6.save");

/// (restore, save, rules) per backend and family.
const BACKENDS: [(&str, &str, &str); 4] = [
    ("iptables-legacy-restore", "iptables-legacy-save", IPV4_RULES),
    ("ip6tables-legacy-restore", "ip6tables-legacy-save", IPV6_RULES),
    ("iptables-nft-restore", "iptables-nft-save", IPV4_RULES),
    ("ip6tables-nft-restore", "ip6tables-nft-save", IPV6_RULES),
];

/// kubelet's KUBE-* chains: not kube-proxy's, so they stay.
const KUBELET_CHAINS: [&str; 3] = ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"];

fn sh(ns: &Netns, program: &str, args: &[&str]) -> String {
    let out = run(ns.command(program).args(args)).unwrap_or_else(|e| panic!("{program} {args:?}: {e:#}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A save's lines without comments and counters (which a later save may
/// print differently).
fn saved(ns: &Netns, save: &str) -> Vec<String> {
    sh(ns, save, &[])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.rfind(" [") {
            Some(at) if l.starts_with(':') => l[..at].to_string(),
            _ => l.to_string(),
        })
        .collect()
}

/// Whether a saved line is kube-proxy's: it names a KUBE-* chain that is not
/// kubelet's.
fn is_kube_proxys(line: &str) -> bool {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .any(|word| word.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&word))
}

fn cleanup(ns: &Netns) {
    let bin = lb_tests::agent::agent_bin();
    let out = ns
        .command(bin.to_str().unwrap())
        .args(["cleanup", "--cleanup-kube-proxy", "--bpf-root"])
        .arg(format!("/sys/fs/bpf/lbt-{}-kp-none", std::process::id()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft_tables(ns: &Netns) -> String {
    sh(ns, "nft", &["list", "tables"])
}

#[test]
fn kube_proxy_chains_and_tables_are_removed_and_others_kept() {
    let ns = Netns::create(&format!("lbt-{}-kp", std::process::id())).unwrap();
    let mut expected = Vec::new();
    for (restore, save, rules) in BACKENDS {
        ns.iptables_restore(restore, &[], rules).unwrap();
        let before = saved(&ns, save);
        assert!(
            before.iter().any(|l| is_kube_proxys(l)),
            "{save}: fixture not loaded:\n{before:#?}"
        );
        expected.push(before.into_iter().filter(|l| !is_kube_proxys(l)).collect::<Vec<_>>());
    }
    for family in ["ip", "ip6"] {
        sh(&ns, "nft", &["add", "table", family, "kube-proxy"]);
        sh(&ns, "nft", &["add", "chain", family, "kube-proxy", "services"]);
    }
    sh(&ns, "nft", &["add", "table", "ip", "someone-else"]);
    // kube-proxy's ipvs mode binds service addresses to a dummy of this name
    // (a veth here: this kernel has no dummy module; removal goes by name).
    ns.ip(&[
        "link",
        "add",
        "kube-ipvs0",
        "type",
        "veth",
        "peer",
        "name",
        "kube-ipvs0-peer",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "198.19.0.10/32", "dev", "kube-ipvs0"]).unwrap();

    cleanup(&ns);

    let mut after = Vec::new();
    for ((_, save, rules), expected) in BACKENDS.iter().zip(&expected) {
        let left = saved(&ns, save);
        assert_eq!(&left, expected, "{save}: not exactly kube-proxy's rules went");
        // The kept lines are the ones that matter: kubelet's chains, others' rules.
        let ipv4 = std::ptr::eq(*rules, IPV4_RULES);
        let mut kept = vec![
            ":KUBE-IPTABLES-HINT - ",
            ":KUBE-KUBELET-CANARY - ",
            "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
            "-A PREROUTING -i eth0 -p tcp -m tcp --dport 5000 -j MARK --set-xmark 0x10/0xffffffff",
        ];
        if ipv4 {
            kept.extend([
                ":KUBE-FIREWALL - ",
                "-A INPUT -j KUBE-FIREWALL",
                "-A POSTROUTING -s 198.18.9.0/24 -j MASQUERADE",
            ]);
        } else {
            kept.push("-A POSTROUTING -s fd00:18:9::/64 -j MASQUERADE");
        }
        for line in kept {
            assert!(
                left.iter().any(|l| l.starts_with(line.trim_end())),
                "{save} lost {line:?}:\n{left:#?}"
            );
        }
        after.push(left);
    }
    let tables = nft_tables(&ns);
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("table ip someone-else"), "{tables}");
    assert!(
        ns.ip(&["link", "show", "kube-ipvs0"]).is_err(),
        "kube-ipvs0 is still there"
    );

    // Again: nothing of kube-proxy's is left, so nothing changes.
    cleanup(&ns);
    for ((_, save, _), after) in BACKENDS.iter().zip(&after) {
        assert_eq!(&saved(&ns, save), after, "{save}: a second cleanup changed something");
    }
    assert_eq!(nft_tables(&ns), tables);
}
