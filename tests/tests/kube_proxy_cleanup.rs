//! `lb-agent cleanup --cleanup-kube-proxy` removes kube-proxy's chains and
//! tables (iptables-legacy, iptables-nft, nftables) from a node namespace
//! and leaves other rules alone.

use lb_tests::netns::{Netns, run};

fn sh(ns: &Netns, program: &str, args: &[&str]) {
    run(ns.command(program).args(args)).unwrap_or_else(|e| panic!("{program} {args:?}: {e:#}"));
}

fn rules(ns: &Netns, save: &str) -> String {
    let out = run(&mut ns.command(save)).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kube_proxy_chains_and_tables_are_removed_and_others_kept() {
    let ns = Netns::create(&format!("lbt-{}-kp", std::process::id())).unwrap();
    for ipt in ["iptables-legacy", "iptables-nft"] {
        for chain in [
            "KUBE-SERVICES",
            "KUBE-SVC-ABCDEF",
            "KUBE-SEP-GHIJKL",
            "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING",
        ] {
            sh(&ns, ipt, &["-t", "nat", "-N", chain]);
        }
        sh(
            &ns,
            ipt,
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES",
            ],
        );
        sh(&ns, ipt, &["-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"]);
        sh(&ns, ipt, &["-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"]);
        sh(
            &ns,
            ipt,
            &[
                "-t",
                "nat",
                "-A",
                "KUBE-SERVICES",
                "-d",
                "198.19.0.10/32",
                "-p",
                "tcp",
                "--dport",
                "8080",
                "-j",
                "KUBE-SVC-ABCDEF",
            ],
        );
        sh(
            &ns,
            ipt,
            &["-t", "nat", "-A", "KUBE-SVC-ABCDEF", "-j", "KUBE-SEP-GHIJKL"],
        );
        sh(
            &ns,
            ipt,
            &[
                "-t",
                "nat",
                "-A",
                "KUBE-SEP-GHIJKL",
                "-p",
                "tcp",
                "-j",
                "DNAT",
                "--to-destination",
                "198.18.1.11:80",
            ],
        );
        sh(&ns, ipt, &["-t", "filter", "-N", "KUBE-FORWARD"]);
        sh(&ns, ipt, &["-t", "filter", "-A", "FORWARD", "-j", "KUBE-FORWARD"]);
        // Somebody else's rule: stays.
        sh(
            &ns,
            ipt,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "198.18.9.0/24",
                "-j",
                "MASQUERADE",
            ],
        );
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
