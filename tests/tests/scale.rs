//! Scale: 10,000 services × 10 endpoints listed by the fake API server are
//! programmed into the kernel maps, and one endpoint change afterwards
//! reaches them. Both times are printed (`cargo xtask test` shows them); the
//! benchmark issue turns them into goals.

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use lb_tests::agent::log_field;
use lb_tests::fake_apiserver::FakeApiServer;
use lb_tests::{Agent, Sandbox};
use serde_json::{Value, json};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Endpoint `e` of service `i` (addresses repeat across services, as pods
/// behind several services do; no traffic goes to them here).
fn endpoint_ip(i: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, (100 + e) as u8, (i % 250 + 1) as u8)
}

fn service(i: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{i}"), "namespace": "scale"},
           "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice(i: u32, endpoints: u32) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| json!({"addresses": [endpoint_ip(i, e).to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "scale",
                        "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

#[test]
#[ignore = "run by `cargo xtask test` on its own, with its output shown"]
fn ten_thousand_services_are_programmed_and_one_change_follows() {
    let sandbox = Sandbox::new("lbt-", &[]).unwrap();
    let listener = sandbox.node.run(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let api = FakeApiServer::start(listener).unwrap();
    for i in 0..SERVICES {
        api.apply(service(i));
        api.apply(slice(i, ENDPOINTS));
    }
    let kubeconfig = sandbox.manifests_dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();

    let started = Instant::now();
    let agent = Agent::start_kube(&sandbox, &kubeconfig, false).expect("agent");
    let first = agent
        .wait_for_log(0, "first sync done", Duration::from_secs(120))
        .unwrap();
    let full_sync = started.elapsed();
    assert_eq!(log_field(&first, "service_ports"), Some(SERVICES as u64), "{first}");
    let view = agent.services().unwrap();
    assert_eq!(view.len(), SERVICES as usize);
    assert!(view.values().all(|b| b.len() == ENDPOINTS as usize));

    // One endpoint of one service goes away.
    let from = agent.log_position();
    let changed = Instant::now();
    api.apply(slice(4242, ENDPOINTS - 1));
    let line = agent
        .wait_for_line(
            from,
            "synced upserted=1",
            |l| l.contains(" synced") && l.contains("upserted=1"),
            Duration::from_secs(30),
        )
        .unwrap();
    let delta = changed.elapsed();
    let view = agent.services().unwrap();
    assert_eq!(view[&format!("{}:80/TCP", vip(4242))].len(), (ENDPOINTS - 1) as usize);

    println!("scale: {SERVICES} services x {ENDPOINTS} endpoints programmed {full_sync:?} after agent start");
    println!(
        "scale: one endpoint change reached the maps {delta:?} after the API server had it (sync itself {}us)",
        log_field(&line, "elapsed_us").unwrap_or(0)
    );
}
