//! Read-only views of a running agent's pinned maps (`lb-agent services`).
//! They never talk to the agent: what they show is what the kernel uses.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

use lb_common::{BackendSlotKey, RawAddr, ServiceScope, map_names, proto};
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

/// As `Frontend`'s Display shows it: nothing for the `Cluster` entry.
fn scope_suffix(scope: u8) -> String {
    if scope == ServiceScope::Internal as u8 {
        format!(" ({})", crate::model::scope_name(ServiceScope::Internal))
    } else if scope != ServiceScope::Cluster as u8 {
        format!(" (scope {scope})")
    } else {
        String::new()
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
            frontend: format!(
                "{}/{}{}",
                endpoint(ip_of(&key.addr), key.port),
                proto_name(key.proto),
                scope_suffix(key.scope)
            ),
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

/// Rows with named columns, printed like kubectl (table) or as JSON.
pub struct Rows {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Rows {
    pub fn print(&self, output: &str) -> anyhow::Result<()> {
        if output == "json" {
            let items: Vec<serde_json::Map<String, serde_json::Value>> = self
                .rows
                .iter()
                .map(|r| {
                    self.columns
                        .iter()
                        .zip(r)
                        .map(|(c, v)| {
                            let value = v
                                .parse::<u64>()
                                .map(serde_json::Value::from)
                                .unwrap_or_else(|_| v.clone().into());
                            (c.to_lowercase(), value)
                        })
                        .collect()
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&items)?);
            return Ok(());
        }
        let mut table = comfy_table::Table::new();
        table
            .load_preset(comfy_table::presets::NOTHING)
            .set_header(self.columns.clone());
        for r in &self.rows {
            table.add_row(r.clone());
        }
        println!("{table}");
        Ok(())
    }
}

fn frontend_of(key: &lb_common::ServiceKey) -> String {
    format!("{}/{}", endpoint(ip_of(&key.addr), key.port), proto_name(key.proto))
}

/// Packets and bytes per service port and per backend, and drops by reason:
/// what `iptables -t nat -vnL` counted per chain.
pub fn stats(maps: &BpfMaps) -> anyhow::Result<Rows> {
    let mut rows = Vec::new();
    let backends: HashMap<u32, lb_common::Backend> = dump(&maps.backends, map_names::BACKENDS)?.into_iter().collect();
    let mut frontends = HashMap::new();
    for (key, value) in dump(&maps.services, map_names::SERVICES)? {
        if value.flags & lb_common::svc_flags::ADDRESS_ONLY != 0 {
            continue;
        }
        let c = maps.service_counter(value.service_id)?;
        frontends.insert(value.service_id, frontend_of(&key));
        rows.push(vec![
            "service".into(),
            frontend_of(&key),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    for (id, b) in &backends {
        let c = maps.backend_counter(*id)?;
        // The same endpoint serves several frontends: name it by both.
        let frontend = frontends.get(&b.service_id).map_or("?", String::as_str);
        let name = format!("{frontend} -> {}", endpoint(ip_of(&b.addr), b.port));
        rows.push(vec!["backend".into(), name, c.packets.to_string(), c.bytes.to_string()]);
    }
    let drops = lb_common::DropReason::ALL.map(|r| ("drop", r.name(), maps.drops(r)));
    let events = lb_common::FlowEvent::ALL.map(|e| ("event", e.name(), maps.events(e)));
    for (kind, name, count) in drops.into_iter().chain(events) {
        rows.push(vec![kind.into(), name.into(), count?.to_string(), "-".into()]);
    }
    rows.sort();
    Ok(Rows {
        columns: vec!["KIND", "NAME", "PACKETS", "BYTES"],
        rows,
    })
}

/// The backends of one frontend (`198.19.0.10:8080/TCP`) with their counters.
pub fn backends_of(maps: &BpfMaps, frontend: &str) -> anyhow::Result<Rows> {
    let slots: HashMap<BackendSlotKey, u32> = dump(&maps.slots, map_names::BACKEND_SLOTS)?.into_iter().collect();
    let backends: HashMap<u32, lb_common::Backend> = dump(&maps.backends, map_names::BACKENDS)?.into_iter().collect();
    let (_, value) = dump(&maps.services, map_names::SERVICES)?
        .into_iter()
        .find(|(k, v)| v.flags & lb_common::svc_flags::ADDRESS_ONLY == 0 && frontend_of(k) == frontend)
        .ok_or_else(|| anyhow::anyhow!("no frontend {frontend} (see `lb-agent services`)"))?;
    let mut rows = Vec::new();
    for slot in 0..value.backend_count {
        let key = BackendSlotKey {
            service_id: value.service_id,
            revision: value.revision,
            slot,
        };
        let Some((id, b)) = slots.get(&key).and_then(|id| backends.get(id).map(|b| (*id, b))) else {
            continue;
        };
        let c = maps.backend_counter(id)?;
        rows.push(vec![
            slot.to_string(),
            id.to_string(),
            endpoint(ip_of(&b.addr), b.port),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    Ok(Rows {
        columns: vec!["SLOT", "ID", "ENDPOINT", "PACKETS", "BYTES"],
        rows,
    })
}

/// Conntrack entries, optionally only those of one frontend's service id.
pub fn conntrack(maps: &BpfMaps, frontend: Option<&str>) -> anyhow::Result<Rows> {
    let wanted = match frontend {
        Some(f) => Some(
            dump(&maps.services, map_names::SERVICES)?
                .into_iter()
                .find(|(k, _)| frontend_of(k) == f)
                .map(|(_, v)| v.service_id)
                .ok_or_else(|| anyhow::anyhow!("no frontend {f}"))?,
        ),
        None => None,
    };
    let mut rows = Vec::new();
    for (k, e) in dump(&maps.conntrack, map_names::CONNTRACK)? {
        if wanted.is_some_and(|id| id != e.service_id) {
            continue;
        }
        let kind = match k.kind {
            k if k == lb_common::CtKind::Forward as u8 => "forward",
            k if k == lb_common::CtKind::Snat as u8 => "snat",
            _ => "reply",
        };
        let snat = if e.flags & lb_common::conntrack::entry_flags::SNAT != 0 {
            endpoint(ip_of(&e.snat_addr), e.snat_port)
        } else {
            "-".into()
        };
        rows.push(vec![
            kind.into(),
            proto_name(k.proto),
            endpoint(ip_of(&k.src_addr), k.src_port),
            endpoint(ip_of(&k.dst_addr), k.dst_port),
            endpoint(ip_of(&e.nat_addr), e.nat_port),
            snat,
            e.backend_id.to_string(),
            lb_common::CtState::of_entry(k.proto, &e).name().into(),
            e.expires_at.to_string(),
        ]);
    }
    rows.sort();
    Ok(Rows {
        columns: vec![
            "DIR", "PROTO", "SRC", "DST", "NAT", "SNAT", "BACKEND", "STATE", "EXPIRES",
        ],
        rows,
    })
}

/// Entries and capacity of the maps.
pub fn maps_fill(maps: &BpfMaps) -> Rows {
    let rows = maps
        .fill()
        .into_iter()
        .map(|(m, n, cap)| vec![m.to_string(), n.to_string(), cap.to_string()])
        .collect();
    Rows {
        columns: vec!["MAP", "ENTRIES", "CAPACITY"],
        rows,
    }
}
