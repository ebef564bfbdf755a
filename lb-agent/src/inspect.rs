//! Read-only views of a running agent's pinned maps (`lb-agent services`).
//! They never talk to the agent: what they show is what the kernel uses.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

use lb_common::{BackendSlotKey, RawAddr, map_names, proto};
use serde::Serialize;

use crate::datapath::BpfMaps;
use crate::datapath::maps::dump;

pub fn ip_of(raw: &RawAddr) -> IpAddr {
    match lb_common::addr::v4_word(raw) {
        Some(word) => IpAddr::from(word.to_ne_bytes()),
        None => IpAddr::from(*raw),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceView {
    pub frontend: String,
    pub service_id: u32,
    pub revision: u32,
    /// Backends of the live revision, in slot order.
    pub backends: Vec<String>,
    /// Slots of the live revision that do not resolve (should be none).
    pub missing_slots: u32,
}

#[derive(Debug, Serialize)]
pub struct ServicesView {
    pub services: Vec<ServiceView>,
    /// Slots of no live revision, backends in no live slot: a clean
    /// datapath has none.
    pub orphan_slots: usize,
    pub orphan_backends: usize,
}

pub fn services(maps: &BpfMaps) -> anyhow::Result<ServicesView> {
    let services = dump(&maps.services, map_names::SERVICES)?;
    let slots: HashMap<BackendSlotKey, u32> = dump(&maps.slots, map_names::BACKEND_SLOTS)?.into_iter().collect();
    let backends: HashMap<u32, lb_common::Backend> = dump(&maps.backends, map_names::BACKENDS)?.into_iter().collect();
    let mut used_slots = BTreeSet::new();
    let mut used_backends = BTreeSet::new();
    let mut views = Vec::new();
    for (key, value) in services {
        if value.flags & lb_common::svc_flags::ADDRESS_ONLY != 0 {
            continue; // a cluster IP's marker, not a frontend
        }
        let mut view = ServiceView {
            frontend: format!("{}/{}", endpoint(ip_of(&key.addr), key.port), proto_name(key.proto)),
            service_id: value.service_id,
            revision: value.revision,
            backends: Vec::new(),
            missing_slots: 0,
        };
        for slot in 0..value.backend_count {
            let k = BackendSlotKey {
                service_id: value.service_id,
                revision: value.revision,
                slot,
            };
            used_slots.insert((k.service_id, k.revision, k.slot));
            match slots.get(&k).and_then(|id| backends.get(id).map(|b| (id, b))) {
                Some((id, b)) => {
                    used_backends.insert(*id);
                    view.backends.push(endpoint(ip_of(&b.addr), b.port));
                }
                None => view.missing_slots += 1,
            }
        }
        views.push(view);
    }
    views.sort();
    Ok(ServicesView {
        services: views,
        orphan_slots: slots
            .keys()
            .filter(|k| !used_slots.contains(&(k.service_id, k.revision, k.slot)))
            .count(),
        orphan_backends: backends.keys().filter(|id| !used_backends.contains(id)).count(),
    })
}

pub fn print_services(bpf_root: &Path, output: &str) -> anyhow::Result<()> {
    let view = services(&BpfMaps::open_pinned(bpf_root)?)?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header(["FRONTEND", "ID", "REV", "BACKENDS"]);
    for s in &view.services {
        let backends = if s.backends.is_empty() {
            "<none>".to_string()
        } else {
            s.backends.join(",")
        };
        table.add_row([
            s.frontend.clone(),
            s.service_id.to_string(),
            s.revision.to_string(),
            backends,
        ]);
    }
    println!("{table}");
    if view.orphan_slots + view.orphan_backends > 0 {
        println!(
            "orphans: {} slots, {} backends",
            view.orphan_slots, view.orphan_backends
        );
    }
    Ok(())
}
