//! kube-proxy's own config file: `--config` takes a
//! `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`, e.g.
//! kubeadm's kube-proxy ConfigMap `config.conf` as is) and, as a second
//! YAML document of the same file, our own settings in one
//! `LbAgentConfiguration` (`lb-agent.io/v1alpha1`) holding the run flags
//! kube-proxy has no field for, as camelCase keys. Pure: parsing and
//! mapping only, no syscalls.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize};
use serde_norway::Value;

use crate::cli::{ConfigFile, ConfigOutcome, LoggingFormat, RunArgs, format_duration, parse_duration};

pub const KUBE_PROXY_API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KUBE_PROXY_KIND: &str = "KubeProxyConfiguration";
pub const EXTENSION_API_VERSION: &str = "lb-agent.io/v1alpha1";
pub const EXTENSION_KIND: &str = "LbAgentConfiguration";

/// The run flags (clap ids) a `KubeProxyConfiguration` field sets, with
/// that field: these keys are refused in the `LbAgentConfiguration`
/// document (one place per setting).
pub const KUBE_PROXY_FIELDS: &[(&str, &str)] = &[
    ("node_name", "hostnameOverride"),
    ("kubeconfig", "clientConnection.kubeconfig"),
    ("cluster_cidr", "clusterCIDR"),
    ("nodeport_addresses", "nodePortAddresses"),
    ("conntrack_max_per_core", "conntrack.maxPerCore"),
    ("conntrack_min", "conntrack.min"),
    ("conntrack_tcp_timeout_established", "conntrack.tcpEstablishedTimeout"),
    ("conntrack_tcp_timeout_close_wait", "conntrack.tcpCloseWaitTimeout"),
    ("conntrack_udp_timeout", "conntrack.udpTimeout"),
    ("conntrack_udp_timeout_stream", "conntrack.udpStreamTimeout"),
    (
        "min_sync_period",
        "iptables.minSyncPeriod (nftables.minSyncPeriod with mode: nftables)",
    ),
    (
        "sync_period",
        "iptables.syncPeriod (nftables.syncPeriod with mode: nftables)",
    ),
    (
        "masquerade_all",
        "iptables.masqueradeAll (nftables.masqueradeAll with mode: nftables)",
    ),
    ("healthz_bind_address", "healthzBindAddress"),
    ("metrics_bind_address", "metricsBindAddress"),
    ("bind_address_hard_fail", "bindAddressHardFail"),
];

/// Flags (clap ids) that win over a `KubeProxyConfiguration`, as in
/// kube-proxy (cmd/kube-proxy/app/options.go: --hostname-override is
/// applied after the file is loaded, --master is no config field, logging
/// flags are copied over the file's `logging`, and --config /
/// --write-config-to select the file).
pub const FLAGS_OVER_FILE: &[&str] = &[
    "config",
    "write_config_to",
    "node_name",
    "master",
    "verbosity",
    "logging_format",
];

/// Fields of kube-proxy's layout that mean nothing to this agent: accepted,
/// and logged once when set to something other than their zero value.
const NOT_APPLICABLE: &[(&str, &str)] = &[
    ("mode", "the eBPF datapath replaces every proxy mode"),
    ("ipvs", "no IPVS here"),
    ("winkernel", "Windows only"),
    ("windowsRunAsService", "Windows only"),
    ("featureGates", "kube-proxy's feature gates"),
    ("bindAddress", "the node's addresses come from its interfaces"),
    ("enableProfiling", "no pprof endpoint"),
    ("showHiddenMetricsForVersion", "our metrics are our own"),
    ("oomScoreAdj", "set it in the pod spec"),
    ("configSyncPeriod", "watches do not resync"),
    ("portRange", "unused by kube-proxy too"),
    ("detectLocal", "local traffic is detected by clusterCIDR"),
    ("clientConnection.acceptContentTypes", "client settings are fixed"),
    ("clientConnection.contentType", "client settings are fixed"),
    ("clientConnection.qps", "client settings are fixed"),
    ("clientConnection.burst", "client settings are fixed"),
    ("logging.flushFrequency", "logs are not buffered"),
    ("logging.options", "logs are not buffered"),
    (
        "iptables.masqueradeBit",
        "no fwmark: masquerading is decided in the datapath",
    ),
    (
        "iptables.localhostNodePorts",
        "NodePorts on localhost are served to host processes",
    ),
    ("iptables.snatNodeInternalIP", "masquerading uses the egress address"),
    (
        "nftables.masqueradeBit",
        "no fwmark: masquerading is decided in the datapath",
    ),
    ("conntrack.tcpBeLiberal", "our conntrack does not track TCP windows"),
];

/// A Go struct field: `null` is the zero value.
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `KubeProxyConfiguration` v1alpha1, the fields this agent maps; the rest
/// is kept in `other` to be reported.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    #[serde(default, deserialize_with = "nullable")]
    pub api_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub client_connection: ClientConnection,
    #[serde(default, deserialize_with = "nullable")]
    pub logging: Logging,
    #[serde(default, deserialize_with = "nullable")]
    pub hostname_override: String,
    #[serde(default, deserialize_with = "nullable")]
    pub healthz_bind_address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub metrics_bind_address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub bind_address_hard_fail: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub mode: String,
    #[serde(default, deserialize_with = "nullable")]
    pub iptables: ProxierSection,
    #[serde(default, deserialize_with = "nullable")]
    pub nftables: ProxierSection,
    #[serde(default, deserialize_with = "nullable")]
    pub detect_local_mode: String,
    #[serde(default, deserialize_with = "nullable", rename = "clusterCIDR")]
    pub cluster_cidr: String,
    #[serde(default)]
    pub node_port_addresses: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub conntrack: Conntrack,
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    #[serde(default, deserialize_with = "nullable")]
    pub kubeconfig: String,
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    #[serde(default, deserialize_with = "nullable")]
    pub format: String,
    #[serde(default, deserialize_with = "nullable")]
    pub verbosity: u32,
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, Value>,
}

/// `iptables` / `nftables`: the fields both share that apply here.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxierSection {
    #[serde(default, deserialize_with = "nullable")]
    pub masquerade_all: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub sync_period: String,
    #[serde(default, deserialize_with = "nullable")]
    pub min_sync_period: String,
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Conntrack {
    #[serde(default)]
    pub max_per_core: Option<i32>,
    #[serde(default)]
    pub min: Option<i32>,
    #[serde(default)]
    pub tcp_established_timeout: Option<String>,
    #[serde(default)]
    pub tcp_close_wait_timeout: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub udp_timeout: String,
    #[serde(default, deserialize_with = "nullable")]
    pub udp_stream_timeout: String,
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, Value>,
}

/// A kube-proxy layout file, mapped.
#[derive(Debug)]
pub struct Loaded {
    /// The run flags it sets.
    pub settings: ConfigFile,
    pub outcome: ConfigOutcome,
}

/// Bad content in kube-proxy's layout.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("document {doc}: {source}")]
    Yaml { doc: usize, source: serde_norway::Error },
    #[error("document {doc}: apiVersion {found:?} with kind {kind}: expected {expected}")]
    ApiVersion {
        doc: usize,
        kind: String,
        found: String,
        expected: &'static str,
    },
    #[error("document {doc}: kind {kind:?}: expected {KUBE_PROXY_KIND} or {EXTENSION_KIND}")]
    Kind { doc: usize, kind: String },
    #[error("more than one {0} document")]
    Duplicate(String),
    #[error("{EXTENSION_KIND}: {key} is set in the {KUBE_PROXY_KIND} as {field}")]
    Duplicated { key: String, field: &'static str },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

fn field_err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// `None` when `text` is not kube-proxy's layout (no document with a
/// `kind`): the caller reads the older flat layout.
pub fn load(text: &str) -> Result<Option<Loaded>, ConfigError> {
    let mut docs = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|source| ConfigError::Yaml { doc: i + 1, source })?;
        if !value.is_null() {
            docs.push((i + 1, value));
        }
    }
    if !docs.iter().any(|(_, v)| v.get("kind").is_some()) {
        return Ok(None);
    }
    let (mut kube_proxy, mut extension) = (None, None);
    for (doc, value) in docs {
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let (slot, expected) = match kind.as_str() {
            KUBE_PROXY_KIND => (&mut kube_proxy, KUBE_PROXY_API_VERSION),
            EXTENSION_KIND => (&mut extension, EXTENSION_API_VERSION),
            _ => return Err(ConfigError::Kind { doc, kind }),
        };
        if api_version != expected {
            return Err(ConfigError::ApiVersion {
                doc,
                kind,
                found: api_version,
                expected,
            });
        }
        if slot.replace((doc, value)).is_some() {
            return Err(ConfigError::Duplicate(kind));
        }
    }
    let mut outcome = ConfigOutcome::default();
    let mut settings = match kube_proxy {
        Some((doc, value)) => {
            let config: KubeProxyConfiguration =
                serde_norway::from_value(value).map_err(|source| ConfigError::Yaml { doc, source })?;
            map_kube_proxy(config, &mut outcome)?
        }
        None => ConfigFile::default(),
    };
    if let Some((doc, mut value)) = extension {
        if let Some(map) = value.as_mapping_mut() {
            map.remove("apiVersion");
            map.remove("kind");
            for key in map.keys().filter_map(Value::as_str) {
                if let Some((_, field)) = KUBE_PROXY_FIELDS.iter().find(|(id, _)| camel_case(id) == key) {
                    return Err(ConfigError::Duplicated {
                        key: key.to_string(),
                        field,
                    });
                }
            }
        }
        let ours: ConfigFile = serde_norway::from_value(value).map_err(|source| ConfigError::Yaml { doc, source })?;
        settings = merge_extension(settings, ours);
    }
    Ok(Some(Loaded { settings, outcome }))
}

/// The kube-proxy document's settings plus the extension's (disjoint keys).
fn merge_extension(kube_proxy: ConfigFile, ours: ConfigFile) -> ConfigFile {
    let mut map = to_mapping(&kube_proxy);
    for (k, v) in to_mapping(&ours) {
        if !v.is_null() {
            map.insert(k, v);
        }
    }
    serde_norway::from_value(Value::Mapping(map)).expect("a ConfigFile's own keys read back")
}

/// Every key of a [`ConfigFile`] (null where unset).
fn to_mapping(settings: &ConfigFile) -> serde_norway::Mapping {
    match serde_norway::to_value(settings) {
        Ok(Value::Mapping(m)) => m,
        _ => unreachable!("a struct serializes to a mapping"),
    }
}

/// The camelCase config key of a run flag's clap id.
pub fn camel_case(id: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in id.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Go's zero value, as kube-proxy's defaulting sees it.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "0" || parse_duration(s) == Ok(std::time::Duration::ZERO),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.values().all(is_zero),
        Value::Tagged(t) => is_zero(&t.value),
    }
}

/// Notes for the fields of `other` (under `prefix`) that are set.
fn note_other(prefix: &str, other: &BTreeMap<String, Value>, notes: &mut Vec<String>) {
    for (key, value) in other {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        // bindAddress: kubeadm writes kube-proxy's default.
        let default_bind = path == "bindAddress" && matches!(value.as_str(), Some("0.0.0.0" | "::"));
        match NOT_APPLICABLE.iter().find(|(field, _)| *field == path) {
            Some(_) if is_zero(value) || default_bind => {}
            Some((_, why)) => notes.push(format!("{KUBE_PROXY_KIND} {path} does not apply here ({why}); ignored")),
            // kube-proxy's lenient v1alpha1 decoding also ignores unknown fields, with a warning.
            None => notes.push(format!("{KUBE_PROXY_KIND} {path}: unknown field, ignored")),
        }
    }
}

/// A duration field: zero (kube-proxy's "unset": defaulted) leaves ours.
fn duration_field(field: &str, v: &str) -> Result<Option<String>, ConfigError> {
    if v.is_empty() {
        return Ok(None);
    }
    // Go writes `1h0m0s`: parse_duration reads that too.
    let d = parse_duration(v).map_err(|e| field_err(field, e))?;
    Ok((!d.is_zero()).then(|| format_duration(d)))
}

/// kube-proxy's bind address: `IP:PORT`, or an IP alone (its default port).
fn bind_address(field: &str, v: &str, default_port: u16) -> Result<Option<String>, ConfigError> {
    if v.is_empty() {
        return Ok(None);
    }
    if let Ok(addr) = v.parse::<SocketAddr>() {
        return Ok(Some(addr.to_string()));
    }
    let ip: IpAddr = v
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| field_err(field, format!("{v:?}: expected IP:PORT or IP")))?;
    Ok(Some(SocketAddr::new(ip, default_port).to_string()))
}

fn check_cidrs(field: &str, list: &[String]) -> Result<(), ConfigError> {
    for c in list {
        c.parse::<crate::model::Cidr>().map_err(|e| field_err(field, e))?;
    }
    Ok(())
}

fn count(field: &str, v: Option<i32>) -> Result<Option<u32>, ConfigError> {
    v.map(|n| u32::try_from(n).map_err(|_| field_err(field, format!("{n}: must not be negative"))))
        .transpose()
}

fn map_kube_proxy(c: KubeProxyConfiguration, outcome: &mut ConfigOutcome) -> Result<ConfigFile, ConfigError> {
    let notes = &mut outcome.notes;
    note_other("", &c.other, notes);
    note_other("clientConnection", &c.client_connection.other, notes);
    note_other("logging", &c.logging.other, notes);
    note_other("iptables", &c.iptables.other, notes);
    note_other("nftables", &c.nftables.other, notes);
    note_other("conntrack", &c.conntrack.other, notes);
    if !c.mode.is_empty() {
        notes.push(format!(
            "{KUBE_PROXY_KIND} mode {:?} does not apply here (the eBPF datapath replaces every proxy mode); ignored",
            c.mode
        ));
    }
    // kube-proxy reads the section of its mode; so do we.
    let (section_name, section) = if c.mode == "nftables" {
        ("nftables", &c.nftables)
    } else {
        ("iptables", &c.iptables)
    };
    match c.detect_local_mode.as_str() {
        "" | "ClusterCIDR" => {}
        other => notes.push(format!(
            "{KUBE_PROXY_KIND} detectLocalMode {other:?} is not supported: local traffic is detected by clusterCIDR \
             (sources outside it are masqueraded)"
        )),
    }
    outcome.verbosity = match c.logging.verbosity {
        0 => None,
        v => Some(u8::try_from(v).unwrap_or(u8::MAX)),
    };
    outcome.logging_format = match c.logging.format.as_str() {
        "" => None,
        "text" => Some(LoggingFormat::Text),
        "json" => Some(LoggingFormat::Json),
        other => return Err(field_err("logging.format", format!("{other:?}: expected text or json"))),
    };
    let cluster_cidr: Vec<String> = c
        .cluster_cidr
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    check_cidrs("clusterCIDR", &cluster_cidr)?;
    let nodeport_addresses = c.node_port_addresses.filter(|l| !l.is_empty());
    for entry in nodeport_addresses.iter().flatten() {
        entry
            .parse::<crate::model::NodePortAddress>()
            .map_err(|e| field_err("nodePortAddresses", e))?;
    }
    let hostname = c.hostname_override.trim().to_lowercase();
    Ok(ConfigFile {
        // kube-proxy lower-cases the name (node names are DNS subdomains).
        node_name: (!hostname.is_empty()).then_some(hostname),
        kubeconfig: (!c.client_connection.kubeconfig.is_empty()).then(|| c.client_connection.kubeconfig.into()),
        cluster_cidr: (!cluster_cidr.is_empty()).then_some(cluster_cidr),
        nodeport_addresses,
        conntrack_max_per_core: count("conntrack.maxPerCore", c.conntrack.max_per_core)?,
        conntrack_min: count("conntrack.min", c.conntrack.min)?,
        conntrack_tcp_timeout_established: duration_field(
            "conntrack.tcpEstablishedTimeout",
            c.conntrack.tcp_established_timeout.as_deref().unwrap_or_default(),
        )?,
        conntrack_tcp_timeout_close_wait: duration_field(
            "conntrack.tcpCloseWaitTimeout",
            c.conntrack.tcp_close_wait_timeout.as_deref().unwrap_or_default(),
        )?,
        conntrack_udp_timeout: duration_field("conntrack.udpTimeout", &c.conntrack.udp_timeout)?,
        conntrack_udp_timeout_stream: duration_field("conntrack.udpStreamTimeout", &c.conntrack.udp_stream_timeout)?,
        min_sync_period: duration_field(&format!("{section_name}.minSyncPeriod"), &section.min_sync_period)?,
        sync_period: duration_field(&format!("{section_name}.syncPeriod"), &section.sync_period)?,
        masquerade_all: Some(section.masquerade_all),
        healthz_bind_address: bind_address("healthzBindAddress", &c.healthz_bind_address, 10256)?,
        metrics_bind_address: bind_address("metricsBindAddress", &c.metrics_bind_address, 10249)?,
        bind_address_hard_fail: Some(c.bind_address_hard_fail),
        ..ConfigFile::default()
    })
}

/// The effective configuration in kube-proxy's layout plus our
/// `LbAgentConfiguration` document (`--write-config-to`).
pub fn effective(args: &RunArgs, verbosity: u8, logging_format: LoggingFormat) -> String {
    let duration = |d| format_duration(d);
    let proxier = ProxierSection {
        masquerade_all: args.masquerade_all,
        sync_period: duration(args.sync_period),
        min_sync_period: duration(args.min_sync_period),
        other: BTreeMap::new(),
    };
    let kube_proxy = KubeProxyConfiguration {
        api_version: KUBE_PROXY_API_VERSION.into(),
        kind: KUBE_PROXY_KIND.into(),
        client_connection: ClientConnection {
            kubeconfig: args
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            other: BTreeMap::new(),
        },
        logging: Logging {
            format: match logging_format {
                LoggingFormat::Text => "text".into(),
                LoggingFormat::Json => "json".into(),
            },
            verbosity: verbosity.into(),
            other: BTreeMap::new(),
        },
        hostname_override: args.node_name.clone().unwrap_or_default(),
        healthz_bind_address: args.healthz_bind_address.clone(),
        metrics_bind_address: args.metrics_bind_address.clone(),
        bind_address_hard_fail: args.bind_address_hard_fail,
        mode: String::new(),
        nftables: ProxierSection {
            other: BTreeMap::new(),
            sync_period: proxier.sync_period.clone(),
            min_sync_period: proxier.min_sync_period.clone(),
            ..proxier
        },
        iptables: proxier,
        detect_local_mode: "ClusterCIDR".into(),
        cluster_cidr: args
            .cluster_cidr
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        node_port_addresses: (!args.nodeport_addresses.is_empty())
            .then(|| args.nodeport_addresses.iter().map(ToString::to_string).collect()),
        conntrack: Conntrack {
            max_per_core: Some(i32::try_from(args.conntrack_max_per_core).unwrap_or(i32::MAX)),
            min: Some(i32::try_from(args.conntrack_min).unwrap_or(i32::MAX)),
            tcp_established_timeout: Some(duration(args.conntrack_tcp_timeout_established)),
            tcp_close_wait_timeout: Some(duration(args.conntrack_tcp_timeout_close_wait)),
            udp_timeout: duration(args.conntrack_udp_timeout),
            udp_stream_timeout: duration(args.conntrack_udp_timeout_stream),
            other: BTreeMap::new(),
        },
        other: BTreeMap::new(),
    };
    let mut ours = serde_norway::Mapping::new();
    ours.insert("apiVersion".into(), EXTENSION_API_VERSION.into());
    ours.insert("kind".into(), EXTENSION_KIND.into());
    for (key, value) in to_mapping(&ConfigFile::from_args(args)) {
        let covered = key
            .as_str()
            .is_some_and(|k| KUBE_PROXY_FIELDS.iter().any(|(id, _)| camel_case(id) == k));
        if !covered && !value.is_null() {
            ours.insert(key, value);
        }
    }
    let first = serde_norway::to_string(&kube_proxy).expect("the configuration serializes");
    let second = serde_norway::to_string(&ours).expect("the configuration serializes");
    format!("{first}---\n{second}")
}

/// The keys of the `LbAgentConfiguration` document: every [`ConfigFile`]
/// key kube-proxy's document does not hold.
pub fn extension_keys() -> Vec<String> {
    to_mapping(&ConfigFile::default())
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|k| !KUBE_PROXY_FIELDS.iter().any(|(id, _)| camel_case(id) == *k))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cli::tests::run_config;
    use crate::cli::{Cli, ForwardingMode};
    use crate::datapath::xdp::XdpModeArg;

    const KUBEADM: &str = include_str!("../tests/fixtures/kubeadm-kube-proxy.conf");
    const EDITED: &str = include_str!("../tests/fixtures/kube-proxy-edited.conf");

    fn cidrs(list: &[crate::model::Cidr]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn kubeadms_default_config_map_gives_our_defaults_and_its_values() {
        let (args, outcome) = run_config(&[], KUBEADM).unwrap();
        let (defaults, _) = run_config(&[], "").unwrap();
        assert_eq!(cidrs(&args.cluster_cidr), ["10.244.0.0/16"]);
        assert_eq!(
            args.kubeconfig.as_deref(),
            Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        // Zero and null fields are kube-proxy's defaults, which are ours.
        assert_eq!(args.sync_period, defaults.sync_period);
        assert_eq!(args.min_sync_period, defaults.min_sync_period);
        assert_eq!(args.conntrack_entries(8), defaults.conntrack_entries(8));
        assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(30));
        assert_eq!(args.conntrack_udp_timeout_stream, Duration::from_secs(120));
        assert_eq!(args.conntrack_tcp_timeout_established, Duration::from_secs(24 * 3600));
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(args.metrics_bind_address, "127.0.0.1:10249");
        assert_eq!(args.node_name, None);
        assert!(args.nodeport_addresses.is_empty());
        assert!(!args.masquerade_all);
        assert!(
            !args.bind_address_hard_fail,
            "kube-proxy's default: a busy port is logged"
        );
        assert_eq!((outcome.verbosity, outcome.logging_format), (None, None));
        assert!(
            outcome.notes.is_empty(),
            "nothing set that does not apply: {:?}",
            outcome.notes
        );
    }

    #[test]
    fn a_hand_edited_config_maps_every_field_and_reports_what_does_not_apply() {
        let (args, outcome) = run_config(&[], EDITED).unwrap();
        assert_eq!(cidrs(&args.cluster_cidr), ["10.244.0.0/16", "fd00:10:244::/56"]);
        assert_eq!(
            args.node_name.as_deref(),
            Some("node-1"),
            "lower-cased as kube-proxy does"
        );
        assert_eq!(args.healthz_bind_address, "[::]:10256");
        assert_eq!(args.metrics_bind_address, "0.0.0.0:10249");
        assert!(args.bind_address_hard_fail);
        let nodeport: Vec<String> = args.nodeport_addresses.iter().map(ToString::to_string).collect();
        assert_eq!(nodeport, ["198.18.0.0/24", "localhost", "primary"]);
        assert_eq!(args.conntrack_entries(4), 2 * 65_536, "maxPerCore 0: the minimum alone");
        assert_eq!(args.conntrack_tcp_timeout_established, Duration::from_secs(7200));
        assert_eq!(args.conntrack_tcp_timeout_close_wait, Duration::from_secs(1800));
        assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(45));
        assert_eq!(args.conntrack_udp_timeout_stream, Duration::from_secs(180));
        // mode: nftables reads the nftables section, as kube-proxy does.
        assert_eq!(args.min_sync_period, Duration::from_secs(2));
        assert_eq!(args.sync_period, Duration::from_secs(45));
        assert!(args.masquerade_all);
        assert_eq!(outcome.verbosity, Some(4));
        assert_eq!(outcome.logging_format, Some(LoggingFormat::Json));
        // The extension document.
        assert_eq!(args.xdp_mode, XdpModeArg::Native);
        assert_eq!(args.xdp_interfaces, ["eth0"]);
        assert_eq!(args.lb_algorithm, "maglev");
        assert_eq!(args.maglev_table_size, 1021);
        assert_eq!(cidrs(&args.service_cluster_ip_range), ["10.96.0.0/12"]);
        let notes = outcome.notes.join("\n");
        for expected in [
            "clientConnection.qps",
            "ipvs",
            "mode \"nftables\"",
            "detectLocalMode \"NodeCIDR\"",
        ] {
            assert!(notes.contains(expected), "{expected} not reported in:\n{notes}");
        }
        assert_eq!(outcome.notes.len(), 4, "each once:\n{notes}");
    }

    #[test]
    fn the_file_wins_over_flags_except_those_kube_proxy_exempts() {
        let (args, outcome) = run_config(
            &[
                "--cluster-cidr",
                "10.0.0.0/8",
                "--hostname-override",
                "from-flag",
                "--master",
                "https://198.18.0.1:6443",
                "--max-services",
                "77",
            ],
            EDITED,
        )
        .unwrap();
        assert_eq!(
            cidrs(&args.cluster_cidr),
            ["10.244.0.0/16", "fd00:10:244::/56"],
            "the file wins"
        );
        assert_eq!(
            args.max_services,
            lb_common::limits::MAX_SERVICES,
            "ignored like any flag"
        );
        assert_eq!(args.node_name.as_deref(), Some("from-flag"), "--hostname-override wins");
        assert_eq!(args.master.unwrap().to_string(), "https://198.18.0.1:6443/");
        let notes = outcome.notes.join("\n");
        assert!(
            notes.contains("--cluster-cidr ignored") && notes.contains("--max-services ignored"),
            "{notes}"
        );
        assert!(!notes.contains("--master") && !notes.contains("--node-name"), "{notes}");
        // The flat layout keeps its rule: flags win.
        let (args, _) = run_config(&["--cluster-cidr", "10.0.0.0/8"], "clusterCidr: [10.1.0.0/16]\n").unwrap();
        assert_eq!(cidrs(&args.cluster_cidr), ["10.0.0.0/8"]);
    }

    #[test]
    fn bad_kube_proxy_content_is_a_clear_error() {
        let kp = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        let err = |extra: &str| run_config(&[], &format!("{kp}{extra}")).unwrap_err();
        let chain = |e: anyhow::Error| format!("{e:#}");
        assert!(chain(err("clusterCIDR: 10.244.0.0/33\n")).contains("clusterCIDR"));
        assert!(chain(err("conntrack: {min: -1}\n")).contains("conntrack.min"));
        assert!(chain(err("iptables: {syncPeriod: soon}\n")).contains("iptables.syncPeriod"));
        assert!(chain(err("healthzBindAddress: here\n")).contains("healthzBindAddress"));
        assert!(chain(err("nodePortAddresses: [primary, 198.18.0.0/99]\n")).contains("nodePortAddresses"));
        assert!(chain(err("logging: {format: xml}\n")).contains("logging.format"));
        let ext = "---\napiVersion: lb-agent.io/v1alpha1\nkind: LbAgentConfiguration\n";
        assert!(chain(err(&format!("{ext}syncPeriod: 5s\n"))).contains("iptables.syncPeriod"));
        assert!(
            run_config(&[], &format!("{kp}{ext}xdpMode: fast\n")).is_err(),
            "bad extension value refused"
        );
        assert!(
            run_config(&[], &format!("{kp}{ext}bogus: 1\n")).is_err(),
            "unknown extension keys refused"
        );
        assert!(chain(err("---\nkind: Service\n")).contains("Service"));
        assert!(chain(err(&format!("---\n{kp}"))).contains("more than one KubeProxyConfiguration"));
        let wrong_version = "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n";
        assert!(chain(run_config(&[], wrong_version).unwrap_err()).contains("v1alpha1"));
        // Unknown kube-proxy fields: warned, as kube-proxy's lenient decoding does.
        let (_, outcome) = run_config(&[], &format!("{kp}someNewField: 1\n")).unwrap();
        assert_eq!(
            outcome.notes,
            ["KubeProxyConfiguration someNewField: unknown field, ignored"]
        );
    }

    /// Every run flag has a config key: a KubeProxyConfiguration field or
    /// a key of our LbAgentConfiguration document.
    #[test]
    fn every_run_flag_has_a_config_key() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run subcommand");
        let ours = extension_keys();
        let mut missing = Vec::new();
        let global_logging = cli.get_arguments().map(|a| a.get_id().as_str().to_string());
        for id in run
            .get_arguments()
            .map(|a| a.get_id().as_str().to_string())
            .chain(global_logging)
        {
            let covered = match id.as_str() {
                // Select the file itself.
                "config" | "write_config_to" | "help" | "version" => true,
                "verbosity" | "logging_format" => true, // logging.verbosity / logging.format
                _ => KUBE_PROXY_FIELDS.iter().any(|(f, _)| *f == id) || ours.contains(&camel_case(&id)),
            };
            if !covered {
                missing.push(id);
            }
        }
        assert!(missing.is_empty(), "run flags without a config key: {missing:?}");
        // The mapping table names real flags.
        for (id, _) in KUBE_PROXY_FIELDS {
            assert!(run.get_arguments().any(|a| a.get_id() == *id), "{id} is no run flag");
        }
    }

    #[test]
    fn write_config_to_round_trips_the_effective_config() {
        let (args, _) = run_config(&[], EDITED).unwrap();
        let text = effective(&args, 4, LoggingFormat::Json);
        let (again, outcome) = run_config(&[], &text).unwrap();
        assert_eq!(
            ConfigFile::from_args(&again).to_string_for_test(),
            ConfigFile::from_args(&args).to_string_for_test()
        );
        assert_eq!(outcome.verbosity, Some(4));
        assert_eq!(outcome.logging_format, Some(LoggingFormat::Json));
        assert!(outcome.notes.is_empty(), "{:?}", outcome.notes);
        assert!(text.contains("kind: KubeProxyConfiguration") && text.contains("kind: LbAgentConfiguration"));
        // Defaults round-trip too, and the older layout still reads.
        let (defaults, _) = run_config(&["--forwarding-mode", "stack"], "").unwrap();
        let (again, _) = run_config(&[], &effective(&defaults, 0, LoggingFormat::Text)).unwrap();
        assert_eq!(again.forwarding_mode, ForwardingMode::Stack);
        assert_eq!(
            ConfigFile::from_args(&again).to_string_for_test(),
            ConfigFile::from_args(&defaults).to_string_for_test()
        );
    }

    impl ConfigFile {
        fn to_string_for_test(&self) -> String {
            serde_norway::to_string(self).unwrap()
        }
    }
}
