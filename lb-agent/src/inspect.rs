//! Read-only views of a running agent's pinned maps (`lb-agent services`).
//! They never talk to the agent: what they show is what the kernel uses.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use lb_common::{BackendSlotKey, ServiceScope, map_names, proto};
use serde::Serialize;

use crate::cli::Output;
use crate::datapath::BpfMaps;
use crate::datapath::maps::dump;

pub use lb_common::addr::to_ip as ip_of;

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

/// A view an inspect command prints: its fields as JSON/YAML, or a table.
pub trait View: Serialize {
    /// Column headers (none: a table without header); `wide` adds the
    /// extra columns.
    fn columns(wide: bool) -> Vec<&'static str>;
    /// One table row per item, as many cells as `columns(wide)`.
    fn rows(&self, wide: bool) -> Vec<Vec<String>>;
    /// Lines printed under the table.
    fn footer(&self) -> Option<String> {
        None
    }
}

/// Prints `view` in the chosen format.
pub fn print<V: View>(view: &V, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(view)?),
        Output::Yaml => print!("{}", serde_norway::to_string(view)?),
        Output::Table | Output::Wide => {
            println!("{}", table_of(view, output == Output::Wide));
            if let Some(footer) = view.footer() {
                println!("{footer}");
            }
        }
    }
    Ok(())
}

/// `view` as a table.
fn table_of<V: View>(view: &V, wide: bool) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    let columns = V::columns(wide);
    if !columns.is_empty() {
        table.set_header(columns);
    }
    for r in view.rows(wide) {
        table.add_row(r);
    }
    table
}

impl View for ServicesView {
    fn columns(wide: bool) -> Vec<&'static str> {
        let mut c = vec!["FRONTEND", "ID", "REV", "BACKENDS"];
        if wide {
            c.extend(["COUNT", "MISSING-SLOTS"]);
        }
        c
    }
    fn rows(&self, wide: bool) -> Vec<Vec<String>> {
        self.services
            .iter()
            .map(|s| {
                let backends = if s.backends.is_empty() {
                    "<none>".to_string()
                } else {
                    s.backends.join(",")
                };
                let mut row = vec![
                    s.frontend.clone(),
                    s.service_id.to_string(),
                    s.revision.to_string(),
                    backends,
                ];
                if wide {
                    row.extend([s.backends.len().to_string(), s.missing_slots.to_string()]);
                }
                row
            })
            .collect()
    }
    fn footer(&self) -> Option<String> {
        (self.orphan_slots + self.orphan_backends > 0).then(|| {
            format!(
                "orphans: {} slots, {} backends",
                self.orphan_slots, self.orphan_backends
            )
        })
    }
}

impl<T: Row> View for Vec<T> {
    fn columns(wide: bool) -> Vec<&'static str> {
        let mut c = T::COLUMNS.to_vec();
        if wide {
            c.extend(T::WIDE_COLUMNS);
        }
        c
    }
    fn rows(&self, wide: bool) -> Vec<Vec<String>> {
        self.iter()
            .map(|item| {
                let mut row = item.cells();
                if wide {
                    row.extend(item.wide_cells());
                }
                row
            })
            .collect()
    }
}

/// One item of a list view (one table row, one JSON object).
pub trait Row: Serialize {
    const COLUMNS: &'static [&'static str];
    const WIDE_COLUMNS: &'static [&'static str] = &[];
    fn cells(&self) -> Vec<String>;
    fn wide_cells(&self) -> Vec<String> {
        Vec::new()
    }
}

fn frontend_of(key: &lb_common::ServiceKey) -> String {
    format!("{}/{}", endpoint(ip_of(&key.addr), key.port), proto_name(key.proto))
}

/// One counter of `lb-agent stats`.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct StatRow {
    /// service, backend, drop or event.
    pub kind: &'static str,
    pub name: String,
    pub packets: u64,
    /// Bytes (services and backends only).
    pub bytes: Option<u64>,
}

impl Row for StatRow {
    const COLUMNS: &'static [&'static str] = &["KIND", "NAME", "PACKETS", "BYTES"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.kind.into(),
            self.name.clone(),
            self.packets.to_string(),
            self.bytes.map_or("-".into(), |b| b.to_string()),
        ]
    }
}

/// Packets and bytes per service port and per backend, and drops by reason:
/// what `iptables -t nat -vnL` counted per chain.
pub fn stats(maps: &BpfMaps) -> anyhow::Result<Vec<StatRow>> {
    let mut rows = Vec::new();
    let backends: HashMap<u32, lb_common::Backend> = dump(&maps.backends, map_names::BACKENDS)?.into_iter().collect();
    let mut frontends = HashMap::new();
    for (key, value) in dump(&maps.services, map_names::SERVICES)? {
        if value.flags & lb_common::svc_flags::ADDRESS_ONLY != 0 {
            continue;
        }
        let c = maps.service_counter(value.service_id)?;
        frontends.insert(value.service_id, frontend_of(&key));
        rows.push(StatRow {
            kind: "service",
            name: frontend_of(&key),
            packets: c.packets,
            bytes: Some(c.bytes),
        });
    }
    for (id, b) in &backends {
        let c = maps.backend_counter(*id)?;
        // The same endpoint serves several frontends: name it by both.
        let frontend = frontends.get(&b.service_id).map_or("?", String::as_str);
        rows.push(StatRow {
            kind: "backend",
            name: format!("{frontend} -> {}", endpoint(ip_of(&b.addr), b.port)),
            packets: c.packets,
            bytes: Some(c.bytes),
        });
    }
    let drops = lb_common::DropReason::ALL.map(|r| ("drop", r.name(), maps.drops(r)));
    let events = lb_common::FlowEvent::ALL.map(|e| ("event", e.name(), maps.events(e)));
    for (kind, name, count) in drops.into_iter().chain(events) {
        rows.push(StatRow {
            kind,
            name: name.into(),
            packets: count?,
            bytes: None,
        });
    }
    rows.sort();
    Ok(rows)
}

/// One backend slot of `lb-agent backends FRONTEND`.
#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub slot: u32,
    pub id: u32,
    pub endpoint: String,
    pub packets: u64,
    pub bytes: u64,
}

impl Row for BackendRow {
    const COLUMNS: &'static [&'static str] = &["SLOT", "ID", "ENDPOINT", "PACKETS", "BYTES"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.slot.to_string(),
            self.id.to_string(),
            self.endpoint.clone(),
            self.packets.to_string(),
            self.bytes.to_string(),
        ]
    }
}

/// The backends of one frontend (`198.19.0.10:8080/TCP`) with their counters.
pub fn backends_of(maps: &BpfMaps, frontend: &str) -> anyhow::Result<Vec<BackendRow>> {
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
        rows.push(BackendRow {
            slot,
            id,
            endpoint: endpoint(ip_of(&b.addr), b.port),
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    Ok(rows)
}

/// One conntrack entry of `lb-agent conntrack`.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConntrackRow {
    /// forward, reply or snat.
    pub dir: &'static str,
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub nat: String,
    /// The masquerade address, "-" when not masqueraded.
    pub snat: String,
    pub backend: u32,
    pub state: &'static str,
    /// Seconds until the entry expires (negative: expired, not purged yet).
    pub expires_in: i64,
    pub service_id: u32,
}

impl Row for ConntrackRow {
    const COLUMNS: &'static [&'static str] = &[
        "DIR",
        "PROTO",
        "SRC",
        "DST",
        "NAT",
        "SNAT",
        "BACKEND",
        "STATE",
        "EXPIRES-IN",
    ];
    const WIDE_COLUMNS: &'static [&'static str] = &["SERVICE-ID"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.dir.into(),
            self.proto.clone(),
            self.src.clone(),
            self.dst.clone(),
            self.nat.clone(),
            self.snat.clone(),
            self.backend.to_string(),
            self.state.into(),
            duration_from_now(self.expires_in),
        ]
    }
    fn wide_cells(&self) -> Vec<String> {
        vec![self.service_id.to_string()]
    }
}

/// `23h59m12s`, `5m0s`, `7s`; `expired` at or before zero.
pub fn duration_from_now(secs: i64) -> String {
    if secs <= 0 {
        return "expired".into();
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Conntrack entries, optionally only those of one frontend's service id;
/// expiry relative to `now` (the datapath's clock, monotonic seconds).
pub fn conntrack(maps: &BpfMaps, frontend: Option<&str>, now: u32) -> anyhow::Result<Vec<ConntrackRow>> {
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
        let dir = match k.kind {
            k if k == lb_common::CtKind::Forward as u8 => "forward",
            k if k == lb_common::CtKind::Snat as u8 => "snat",
            _ => "reply",
        };
        let snat = if e.flags & lb_common::conntrack::entry_flags::SNAT != 0 {
            endpoint(ip_of(&e.snat_addr), e.snat_port)
        } else {
            "-".into()
        };
        rows.push(ConntrackRow {
            dir,
            proto: proto_name(k.proto),
            src: endpoint(ip_of(&k.src_addr), k.src_port),
            dst: endpoint(ip_of(&k.dst_addr), k.dst_port),
            nat: endpoint(ip_of(&e.nat_addr), e.nat_port),
            snat,
            backend: e.backend_id,
            state: lb_common::CtState::of_entry(k.proto, &e).name(),
            expires_in: i64::from(e.expires_at) - i64::from(now),
            service_id: e.service_id,
        });
    }
    rows.sort();
    Ok(rows)
}

/// Entries and capacity of one map (`lb-agent maps`).
#[derive(Debug, Serialize)]
pub struct MapRow {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

impl Row for MapRow {
    const COLUMNS: &'static [&'static str] = &["MAP", "ENTRIES", "CAPACITY"];
    const WIDE_COLUMNS: &'static [&'static str] = &["FILL"];
    fn cells(&self) -> Vec<String> {
        vec![self.map.into(), self.entries.to_string(), self.capacity.to_string()]
    }
    fn wide_cells(&self) -> Vec<String> {
        let percent = if self.capacity == 0 {
            0.0
        } else {
            100.0 * self.entries as f64 / f64::from(self.capacity)
        };
        vec![format!("{percent:.1}%")]
    }
}

/// Entries and capacity of the maps.
pub fn maps_fill(maps: &BpfMaps) -> Vec<MapRow> {
    maps.fill()
        .into_iter()
        .map(|(map, entries, capacity)| MapRow { map, entries, capacity })
        .collect()
}

/// The node settings the datapath runs with (the CONFIG map).
#[derive(Debug, Serialize)]
pub struct NodeConfigView {
    /// Conntrack lifetimes in seconds, as the datapath applies them.
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    pub tcp_close_wait_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    pub udp_stream_timeout: u32,
    /// redirect or stack (`--forwarding-mode`).
    pub forwarding_mode: &'static str,
}

impl NodeConfigView {
    fn of(c: &lb_common::sock::NodeConfig) -> Self {
        use lb_common::conntrack::ct_timeouts as default;
        // 0 in CONFIG: the datapath's default.
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        Self {
            tcp_syn_timeout: or(c.tcp_syn_timeout, default::TCP_SYN),
            tcp_established_timeout: or(c.tcp_established_timeout, default::TCP_ESTABLISHED),
            tcp_close_wait_timeout: or(c.tcp_close_wait_timeout, default::TCP_CLOSE_WAIT),
            tcp_closing_timeout: or(c.tcp_closing_timeout, default::TCP_CLOSING),
            udp_timeout: or(c.udp_timeout, default::UDP),
            udp_stream_timeout: or(c.udp_stream_timeout, default::UDP_STREAM),
            forwarding_mode: if c.flags & lb_common::sock::config_flags::STACK_FORWARDING != 0 {
                "stack"
            } else {
                "redirect"
            },
        }
    }
}

/// A pinned TC/XDP/socket-hook link (`<root>/links/NAME`).
#[derive(Debug, Serialize)]
pub struct LinkView {
    pub pin: String,
    /// The interface of a per-interface link, in this network namespace.
    pub interface: Option<String>,
}

/// `lb-agent status`: what is pinned under a bpf root, read from the pins
/// only (the agent may be down).
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// This lb-agent binary's version.
    pub version: &'static str,
    pub bpf_root: String,
    /// Layout versions recorded per map (`NAME-vN`).
    pub layouts: Vec<String>,
    pub links: Vec<LinkView>,
    pub config: NodeConfigView,
    pub maps: Vec<MapRow>,
    /// How long ago the running agent last synced, from its /metrics
    /// (`--metrics-address`); "unknown" without: the pins do not record it.
    pub last_sync: String,
    /// That sync's time (unix seconds), when known.
    pub last_sync_unix: Option<f64>,
}

/// kube-proxy's gauge of the last successful sync.
const LAST_SYNC_METRIC: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";

/// The largest value of the samples of `name` (any labels, e.g. one per
/// IP family) in a Prometheus text exposition.
fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once('}')?.1,
                None => rest,
            };
            rest.strip_prefix(' ')?.split_whitespace().next()?.parse::<f64>().ok()
        })
        .reduce(f64::max)
}

/// GET http://ADDRESS/metrics (the agent's --metrics-bind-address).
fn fetch_metrics(address: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(2);
    let to = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{address}: no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    // HTTP/1.0: the server closes after the response.
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// (how long ago, unix seconds) of the last sync, from the agent's metrics.
fn last_sync(metrics_address: Option<&str>) -> (String, Option<f64>) {
    let Some(address) = metrics_address else {
        return ("unknown".into(), None);
    };
    let at = match fetch_metrics(address) {
        Ok(body) => metric_value(&body, LAST_SYNC_METRIC),
        Err(e) => return (format!("unknown (metrics at {address}: {e})"), None),
    };
    let Some(at) = at.filter(|t| *t > 0.0) else {
        return ("never".into(), None);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    (
        format!("{} ago", duration_from_now((now - at).max(1.0) as i64)),
        Some(at),
    )
}

/// The name of interface `ifindex` in this network namespace.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires; on
    // success it is NUL-terminated.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: non-null: buf holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

pub fn status(bpf_root: &std::path::Path, metrics_address: Option<&str>) -> anyhow::Result<StatusView> {
    let maps = BpfMaps::open_pinned(bpf_root)?;
    let config = maps
        .config
        .get(&0, 0)
        .map_err(|e| anyhow::anyhow!("reading CONFIG: {e}"))?;
    let links = dir_names(&bpf_root.join(crate::datapath::attach::LINK_DIR))
        .into_iter()
        .map(|pin| {
            // Per-interface links end in the ifindex (`xdp-3`).
            let ifindex = pin.rsplit('-').next().and_then(|n| n.parse().ok());
            LinkView {
                interface: ifindex.and_then(interface_name),
                pin,
            }
        })
        .collect();
    let last_sync = last_sync(metrics_address);
    Ok(StatusView {
        version: env!("CARGO_PKG_VERSION"),
        bpf_root: bpf_root.display().to_string(),
        layouts: dir_names(&bpf_root.join(crate::datapath::migrate::LAYOUT_DIR)),
        links,
        config: NodeConfigView::of(&config),
        maps: maps_fill(&maps),
        last_sync: last_sync.0,
        last_sync_unix: last_sync.1,
    })
}

impl View for StatusView {
    /// Field and value lines, no header.
    fn columns(_wide: bool) -> Vec<&'static str> {
        Vec::new()
    }
    fn rows(&self, _wide: bool) -> Vec<Vec<String>> {
        let c = &self.config;
        let links: Vec<String> = self
            .links
            .iter()
            .map(|l| match &l.interface {
                Some(i) => format!("{} ({i})", l.pin),
                None => l.pin.clone(),
            })
            .collect();
        let rows = vec![
            ("version", self.version.to_string()),
            ("bpf root", self.bpf_root.clone()),
            ("layouts", self.layouts.join(" ")),
            ("links", links.join(" ")),
            ("forwarding mode", c.forwarding_mode.to_string()),
            (
                "conntrack timeouts",
                format!(
                    "tcp syn {}s, established {}s, close-wait {}s, closing {}s; udp {}s, stream {}s",
                    c.tcp_syn_timeout,
                    c.tcp_established_timeout,
                    c.tcp_close_wait_timeout,
                    c.tcp_closing_timeout,
                    c.udp_timeout,
                    c.udp_stream_timeout
                ),
            ),
            ("last sync", self.last_sync.clone()),
        ];
        rows.into_iter().map(|(k, v)| vec![k.to_string(), v]).collect()
    }
    fn footer(&self) -> Option<String> {
        // The fill levels, as `lb-agent maps` shows them.
        Some(format!("\n{}", table_of(&self.maps, false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_from_now() {
        for (secs, shown) in [
            (86352, "23h59m12s"),
            (3600, "1h0m0s"),
            (300, "5m0s"),
            (59, "59s"),
            (1, "1s"),
            (0, "expired"),
            (-5, "expired"),
        ] {
            assert_eq!(duration_from_now(secs), shown, "{secs}");
        }
    }

    #[test]
    fn metric_values_by_exact_name() {
        let body = "HTTP/1.0 200 OK\r\n\r\n# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds x\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds_total 3\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1796620000.5\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"} 1796610000\n";
        assert_eq!(metric_value(body, LAST_SYNC_METRIC), Some(1796620000.5));
        assert_eq!(metric_value("x 2\nx{a=\"b\"} 3\n", "x"), Some(3.0));
        assert_eq!(metric_value(body, "absent"), None);
    }

    #[test]
    fn wide_adds_columns_and_cells() {
        let rows = vec![MapRow {
            map: "CONNTRACK",
            entries: 1,
            capacity: 4,
        }];
        assert_eq!(<Vec<MapRow>>::columns(false), ["MAP", "ENTRIES", "CAPACITY"]);
        assert_eq!(rows.rows(false), [["CONNTRACK", "1", "4"]]);
        assert_eq!(<Vec<MapRow>>::columns(true).len(), 4);
        assert_eq!(rows.rows(true), [["CONNTRACK", "1", "4", "25.0%"]]);
        let yaml = serde_norway::to_string(&rows).unwrap();
        assert!(
            yaml.contains("map: CONNTRACK") && yaml.contains("capacity: 4"),
            "{yaml}"
        );
    }
}
