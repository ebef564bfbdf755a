//! The manifests source under churn at 10,000 services (one file per
//! Service + EndpointSlice, as config managers lay them out), with the real
//! agent: files replaced atomically (temporary file renamed over the old
//! one) never make a service disappear from the maps — read continuously
//! while the burst lands — and every change is applied; changes overtake
//! the periodic full resync; SIGTERM during the initial read of the files
//! ends the agent at once and leaves the maps as they were.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_agent::datapath::BpfMaps;
use lb_agent::sync::DatapathMaps;
use lb_tests::manifests::{PortDef, ServiceDef, service};
use lb_tests::{Agent, Sandbox};

const SERVICES: usize = 10_000;
/// Files replaced in one burst.
const BURST: usize = 100;
const PODS: [&str; 2] = ["churn-a", "churn-b"];

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250 + 1) as u8, (i % 250 + 1) as u8)
}

/// Service `churn-i` (TCP 80 → 80) on `pod`.
fn manifest(i: usize, pod: &str, pod_ip: Ipv4Addr) -> String {
    let name: &'static str = format!("churn-{i}").leak();
    service(&ServiceDef {
        name,
        cluster_ip: cluster_ip(i),
        ports: vec![PortDef {
            name: "http",
            protocol: "TCP",
            port: 80,
            target_port: 80,
        }],
        endpoints: vec![(pod.to_string(), pod_ip)],
    })
}

fn file_name(i: usize) -> String {
    format!("churn-{i:05}.yaml")
}

/// How many frontends (port ≠ 0: cluster IP markers left out) SERVICES holds.
fn frontends(maps: &BpfMaps) -> usize {
    maps.dump_services()
        .expect("reading SERVICES")
        .iter()
        .filter(|(k, _)| k.port != 0)
        .count()
}

#[test]
fn renames_never_drop_a_service_changes_overtake_resyncs_and_sigterm_is_prompt() {
    let sandbox = Sandbox::new("lbt-", &PODS).expect("sandbox");
    let (a, b) = (sandbox.pods[0].ip, sandbox.pods[1].ip);
    for i in 0..SERVICES {
        std::fs::write(sandbox.manifests_dir.join(file_name(i)), manifest(i, PODS[0], a)).unwrap();
    }
    let args = [
        OsStr::new("--manifests"),
        sandbox.manifests_dir.as_os_str(),
        // A full resync every second, so changes meet one, and changes
        // applied as they come (no rate limit to hide behind).
        OsStr::new("--sync-period"),
        OsStr::new("1s"),
        OsStr::new("--min-sync-period"),
        OsStr::new("0"),
    ];
    let agent = Agent::spawn(&sandbox, &args, false).unwrap();
    agent
        .wait_for_log(0, " ready", Duration::from_secs(120))
        .expect("agent ready with 10,000 services");
    let maps = BpfMaps::open_pinned(&sandbox.bpf_root).unwrap();
    assert_eq!(frontends(&maps), SERVICES);

    // 1. A burst of atomic replacements while a reader watches the maps.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, root) = (stop.clone(), sandbox.bpf_root.clone());
        std::thread::spawn(move || {
            let maps = BpfMaps::open_pinned(&root).unwrap();
            let (mut reads, mut fewest) = (0usize, usize::MAX);
            while !stop.load(Ordering::Relaxed) {
                fewest = fewest.min(frontends(&maps));
                reads += 1;
            }
            (reads, fewest)
        })
    };
    let from = agent.log_position();
    let started = Instant::now();
    for i in 0..BURST {
        let tmp = sandbox.manifests_dir.join(format!(".{}.tmp", file_name(i)));
        std::fs::write(&tmp, manifest(i, PODS[1], b)).unwrap();
        std::fs::rename(&tmp, sandbox.manifests_dir.join(file_name(i))).unwrap();
    }
    let burst = started.elapsed();
    let moved: BTreeSet<String> = (0..BURST).map(|i| format!("{}:80/TCP", cluster_ip(i))).collect();
    let want = vec![format!("{b}:80")];
    agent
        .wait_for_services(
            |v| moved.iter().all(|f| v.get(f) == Some(&want)),
            Duration::from_secs(30),
        )
        .expect("all 100 replacements applied");
    let applied = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (reads, fewest) = reader.join().unwrap();
    eprintln!(
        "churn: {BURST} renames in {burst:?}, all applied after {applied:?}; {reads} reads of the maps, fewest frontends {fewest}"
    );
    assert!(reads >= 3, "the maps were read only {reads} times during the burst");
    assert_eq!(fewest, SERVICES, "a service vanished while its file was replaced");
    let log = agent.log();
    assert!(
        !log[..]
            .lines()
            .skip(from)
            .any(|l| l.contains("removed=") && !l.contains("removed=0")),
        "a sync removed services during the burst:\n{log}"
    );

    // 2. Changes keep flowing while periodic full resyncs read the maps:
    //    some partial sync lands between a resync's start and its end.
    let mark = agent.log_position();
    let mut slowest = Duration::ZERO;
    for round in 0..12 {
        let i = BURST + round;
        let from = agent.log_position();
        sandbox.write_manifest(&file_name(i), &manifest(i, PODS[1], b)).unwrap();
        slowest = slowest.max(agent.wait_manifest_synced(from, Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(97));
    }
    let lines: Vec<String> = agent.log().lines().skip(mark).map(String::from).collect();
    let mut reading = false;
    let mut overtaken = 0;
    for l in &lines {
        if l.contains("periodic resync: reading the maps") {
            reading = true;
        } else if reading && l.contains(" synced") && l.contains("full=true") {
            reading = false;
        } else if reading && l.contains(" synced") && l.contains("full=false") {
            overtaken += 1;
        }
    }
    eprintln!("churn: slowest change {slowest:?}; {overtaken} syncs ran while a full resync read the maps");
    assert!(
        lines.iter().any(|l| l.contains("periodic resync: reading the maps")),
        "no periodic resync during the changes"
    );
    assert!(
        overtaken > 0,
        "no change was applied while a full resync was under way:\n{}",
        lines.join("\n")
    );

    // 3. SIGTERM while a new agent reads the 10,000 files: it ends at once
    //    and the maps keep what the previous agent programmed.
    agent.stop().unwrap();
    let before = frontends(&maps);
    let next = Agent::spawn(&sandbox, &args, false).unwrap();
    next.wait_for_log(0, "source: manifests", Duration::from_secs(30))
        .unwrap();
    let sent = Instant::now();
    let log = next.log();
    let status = next.stop().unwrap();
    let took = sent.elapsed();
    eprintln!("churn: SIGTERM during the initial read ended the agent in {took:?} ({status})");
    assert!(
        !log.contains("manifests read"),
        "the read had finished before SIGTERM: the test proves nothing\n{log}"
    );
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    assert_eq!(frontends(&maps), before, "the maps changed");
}
