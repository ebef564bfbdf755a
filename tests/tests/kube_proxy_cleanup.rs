//! `lb-agent cleanup --cleanup-kube-proxy` removes kube-proxy's chains and
//! tables (iptables-legacy, iptables-nft, nftables) from a node namespace
//! and leaves other rules alone.

use lb_tests::netns::{Netns, run};

fn sh(ns: &Netns, program: &str, args: &[&str]) {
    run(ns.command(program).args(args)).unwrap_or_else(|e| panic!("{program} {args:?}: {e:#}"));
}

/// kube-proxy's kind of rules (nat: portals, a service, an endpoint, the
/// masquerade chains; filter: KUBE-FORWARD) and somebody else's rule.
const RULES: &str = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEF - [0:0]
:KUBE-SEP-GHIJKL - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp --dport 8080 -j KUBE-SVC-ABCDEF
-A KUBE-SVC-ABCDEF -j KUBE-SEP-GHIJKL
-A KUBE-SEP-GHIJKL -p tcp -j DNAT --to-destination 198.18.1.11:80
-A POSTROUTING -s 198.18.9.0/24 -j MASQUERADE
COMMIT
*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -j KUBE-FORWARD
COMMIT
"#;

fn rules(ns: &Netns, save: &str) -> String {
    let out = run(&mut ns.command(save)).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kube_proxy_chains_and_tables_are_removed_and_others_kept() {
    let ns = Netns::create(&format!("lbt-{}-kp", std::process::id())).unwrap();
    for restore in ["iptables-legacy-restore", "iptables-nft-restore"] {
        ns.iptables_restore(restore, &[], RULES).unwrap();
    }
    sh(&ns, "nft", &["add", "table", "ip", "kube-proxy"]);
    sh(&ns, "nft", &["add", "chain", "ip", "kube-proxy", "services"]);
    sh(&ns, "nft", &["add", "table", "ip", "someone-else"]);

    let bin = lb_tests::agent::agent_bin();
    let status = ns
        .command(bin.to_str().unwrap())
        .args(["cleanup", "--cleanup-kube-proxy", "--bpf-root"])
        .arg(format!("/sys/fs/bpf/lbt-{}-kp-none", std::process::id()))
        .status()
        .unwrap();
    assert!(status.success());

    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let left = rules(&ns, save);
        assert!(!left.contains("KUBE-"), "{save} still has kube-proxy rules:\n{left}");
        assert!(
            left.contains("-A POSTROUTING -s 198.18.9.0/24 -j MASQUERADE"),
            "{save} lost a foreign rule:\n{left}"
        );
    }
    let tables = String::from_utf8_lossy(&run(ns.command("nft").args(["list", "tables"])).unwrap().stdout).into_owned();
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("someone-else"), "{tables}");
}
