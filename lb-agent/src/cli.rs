//! Command line. Flags are named like kube-proxy's where they mean the same.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::datapath::xdp::XdpModeArg;
use crate::model::{Cidr, NodePortAddress};

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF Kubernetes service load balancer (kube-proxy replacement)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log verbosity, klog-style like kube-proxy's --v: 0–1 info, 2–4
    /// debug (each sync's changes), 5+ trace. RUST_LOG overrides it.
    #[arg(short = 'v', long = "v", global = true, default_value_t = 0, value_name = "LEVEL")]
    pub verbosity: u8,
    /// Log format, as kube-proxy's --logging-format: text, or json (one
    /// object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub logging_format: LoggingFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoggingFormat {
    Text,
    Json,
}

impl Cli {
    /// The tracing level for `--v`.
    pub fn log_level(&self) -> &'static str {
        match self.verbosity {
            0..=1 => "info",
            2..=4 => "debug",
            _ => "trace",
        }
    }
}

impl Cli {
    /// The config file's `logging` settings that apply: those the command
    /// line does not give (kube-proxy copies logging flags over the file's).
    pub fn config_logging(outcome: &ConfigOutcome, matches: &clap::ArgMatches) -> (Option<u8>, Option<LoggingFormat>) {
        let from_cli = |id: &str| {
            std::iter::once(matches)
                .chain(matches.subcommand().map(|(_, m)| m))
                .any(|m| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        };
        (
            outcome.verbosity.filter(|_| !from_cli("verbosity")),
            outcome.logging_format.filter(|_| !from_cli("logging_format")),
        )
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Program the datapath from a source and keep it in sync.
    Run(Box<RunArgs>),
    /// Show the service ports programmed in the pinned maps of a running agent.
    Services(InspectArgs),
    /// Packets/bytes per service port and backend, drops by reason, and
    /// datapath events (evicted flows seen again).
    Stats(InspectArgs),
    /// The backends of one frontend, e.g. 198.19.0.10:8080/TCP.
    Backends {
        frontend: String,
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Conntrack entries (of one frontend with --service).
    Conntrack {
        /// Only entries of this frontend, e.g. 198.19.0.10:8080/TCP.
        #[arg(long, value_name = "FRONTEND")]
        service: Option<String>,
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Entries and capacity of the datapath maps.
    Maps(InspectArgs),
    /// The pinned datapath at a glance, read from the pins only (the agent
    /// may be down): version, layouts, attached links, node settings, map
    /// fill levels; the last sync from a running agent's metrics.
    Status {
        /// The agent's metrics endpoint (its --metrics-bind-address, e.g.
        /// 127.0.0.1:10249), to show when it last synced.
        #[arg(long, value_name = "HOST:PORT")]
        metrics_address: Option<String>,
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Run one crafted packet through the loaded program on the live maps
    /// and show what happens to it (run in the node's network namespace).
    Trace {
        /// Source IPv4[:PORT] (port default 40000).
        #[arg(long)]
        src: String,
        /// Destination IPv4:PORT.
        #[arg(long)]
        dst: String,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "sctp"])]
        proto: String,
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Remove an agent's programs, links and pins (the agent stopped).
    Cleanup(CleanupArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CleanupArgs {
    /// The agent's --bpf-root.
    #[arg(long, default_value = "/sys/fs/bpf/lb-agent")]
    pub bpf_root: PathBuf,
    /// Remove what kube-proxy left in this namespace, like `kube-proxy
    /// --cleanup`: its iptables chains and the jumps to them (iptables and
    /// ip6tables, legacy and nft; kubelet's KUBE-FIREWALL,
    /// KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT stay), its nftables
    /// `kube-proxy` tables and ipvs mode's kube-ipvs0 — and nothing of ours
    /// unless --datapath is given too (the DaemonSet's takeover init
    /// container runs this at every start).
    #[arg(long)]
    pub cleanup_kube_proxy: bool,
    /// Remove this agent's datapath (programs, links, pins): what
    /// `cleanup` does when no other flag is given.
    #[arg(long)]
    pub datapath: bool,
    /// After cleaning up, keep running until SIGTERM: the uninstall
    /// DaemonSet (deploy/uninstall/) shows each node done as a running pod.
    #[arg(long)]
    pub hold: bool,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// The running agent's --bpf-root.
    #[arg(long, default_value = "/sys/fs/bpf/lb-agent")]
    pub bpf_root: PathBuf,
    /// Output format: a table (wide: with extra columns), or the view's
    /// fields as JSON or YAML.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// How an inspect command prints its view.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Config file: kube-proxy's own (a `KubeProxyConfiguration`, e.g.
    /// kubeadm's kube-proxy ConfigMap as is, plus an optional
    /// `LbAgentConfiguration` document for our settings; the file wins over
    /// flags as in kube-proxy, except --hostname-override, --master, --v and
    /// --logging-format), or the older flat layout (these flags as camelCase
    /// keys; flags on the command line win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the effective configuration (kube-proxy's layout plus our
    /// `LbAgentConfiguration` document) to this file and exit.
    #[arg(long, value_name = "PATH")]
    pub write_config_to: Option<PathBuf>,
    /// This node's name (the Node object, endpoints' nodeName); default: the hostname.
    #[arg(long, alias = "hostname-override")]
    pub node_name: Option<String>,
    /// Read objects from this file or directory of Kubernetes YAML instead of an API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address, e.g. https://192.168.0.10:6443 (overrides
    /// the kubeconfig's and the in-cluster `kubernetes` Service address,
    /// which nothing programs before this agent runs: set it on nodes
    /// without kube-proxy). The service account's token and CA are still
    /// used when present.
    #[arg(long, value_parser = parse_master, conflicts_with = "manifests")]
    pub master: Option<http::Uri>,
    /// Directory on a bpffs where the maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/lb-agent")]
    pub bpf_root: PathBuf,
    /// Interfaces to attach to (comma-separated); default: all but loopback,
    /// including interfaces created later.
    #[arg(long, value_delimiter = ',')]
    pub interfaces: Option<Vec<String>>,
    /// XDP fast path for NodePort / LoadBalancer / externalIP traffic on
    /// --xdp-interfaces: native (driver mode, generic where the driver has
    /// no XDP), generic (skb mode), or off. What XDP cannot finish goes to
    /// the TC path.
    #[arg(long, value_enum, default_value = "off")]
    pub xdp_mode: XdpModeArg,
    /// The node's external interfaces, where XDP runs (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub xdp_interfaces: Vec<String>,
    /// In native mode, further devices XDP may redirect frames to
    /// (comma-separated, a trailing `*` matches a prefix), e.g. pod veths
    /// whose pod-side peers take XDP frames (GRO on or an XDP program).
    /// Other flows are forwarded by the TC path.
    #[arg(long, value_delimiter = ',')]
    pub xdp_redirect_interfaces: Vec<String>,
    /// Capacity for service ports (frontends: cluster IPs, NodePorts ×
    /// node addresses, external and load-balancer IPs) and cluster IPs.
    #[arg(long, default_value_t = lb_common::limits::MAX_SERVICES)]
    pub max_services: u32,
    /// Capacity for backends (service port × endpoint).
    #[arg(long, default_value_t = lb_common::limits::MAX_BACKENDS)]
    pub max_backends: u32,
    /// How new flows pick a backend: random (kube-proxy's choice) or maglev
    /// (consistent hashing of the flow); per service the
    /// `lb-agent.io/lb-algorithm` annotation overrides it.
    #[arg(long, default_value = "random", value_parser = ["random", "maglev"])]
    pub lb_algorithm: String,
    /// Maglev table size per service port: a prime, ~100x its backends.
    #[arg(long, default_value_t = lb_common::limits::DEFAULT_MAGLEV_TABLE_SIZE, value_parser = parse_prime)]
    pub maglev_table_size: u32,
    /// Conntrack table capacity in entries (two per flow: forward and
    /// reply); overrides --conntrack-max-per-core / --conntrack-min.
    #[arg(long)]
    pub conntrack_max: Option<u32>,
    /// Flows to track per CPU (kube-proxy's flag): the table holds
    /// max(this × CPUs, --conntrack-min) flows.
    #[arg(long, default_value_t = 32_768)]
    pub conntrack_max_per_core: u32,
    /// Minimum number of flows to track, whatever the CPU count.
    #[arg(long, default_value_t = 131_072)]
    pub conntrack_min: u32,
    /// Conntrack lifetime of idle established TCP flows.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// Conntrack lifetime of TCP flows after a FIN from one side only
    /// (nf_conntrack's CLOSE_WAIT: the other side may still send).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// Conntrack lifetime of TCP flows after FINs from both sides or a RST.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close: Duration,
    /// Conntrack lifetime of TCP flows that only sent SYN.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_syn: Duration,
    /// Conntrack lifetime of idle UDP (and other non-TCP) flows that have
    /// seen no reply.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,
    /// Conntrack lifetime of idle UDP flows that have seen a reply (a
    /// "stream", nf_conntrack's ASSURED).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,
    /// How often expired conntrack entries are deleted.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub conntrack_gc_interval: Duration,
    /// Minimum interval between syncs (two may run back to back, as in
    /// kube-proxy); 0 syncs on every change.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_sync_period: Duration,
    /// Interval of full resyncs, which repair any map entry that differs from the model.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// Only node addresses in these CIDRs get NodePorts (comma-separated),
    /// or kube-proxy's keywords `primary` (the Node object's primary
    /// address per family), `localhost`, `all`; default: every address.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// Pod CIDRs of the cluster (comma-separated, one per family): traffic
    /// to cluster IPs from outside them is masqueraded.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<Cidr>,
    /// Service CIDRs: addresses in them without a service are dropped.
    #[arg(long, value_delimiter = ',')]
    pub service_cluster_ip_range: Vec<Cidr>,
    /// cgroup2 directory for the host-network socket hooks; default: the
    /// system's cgroup2 mount, else one mounted on /run/lb-agent/cgroup2.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Prometheus /metrics address ("" to disable).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// Also serve per-backend series (`lbagent_backend_packets_total`): one
    /// per endpoint, unbounded on a big cluster, so off by default.
    #[arg(long)]
    pub metrics_per_backend: bool,
    /// /healthz and /livez address ("" to disable); 0.0.0.0 or [::] take
    /// both families.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Exit when the metrics or healthz address cannot be bound (kube-proxy's
    /// bindAddressHardFail); with false the agent logs it and runs without
    /// that endpoint.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub bind_address_hard_fail: bool,
    /// On exit, detach the programs and remove the pins. By default the
    /// datapath stays in place (pinned) and keeps serving until the next
    /// agent takes it over, as kube-proxy's rules outlive kube-proxy.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// Where translated service packets go after TC ingress: `redirect`
    /// sends them straight to the next hop, past netfilter's FORWARD chain
    /// (fastest); `stack` hands them to the kernel's routing, so FORWARD
    /// rules — iptables-based NetworkPolicy (Calico in iptables mode,
    /// kube-router, flannel with a policy controller) — apply to service
    /// traffic too. In `stack` mode masquerading happens at TC egress and
    /// the XDP fast path hands balanced flows to the stack.
    #[arg(long, value_enum, default_value = "redirect")]
    pub forwarding_mode: ForwardingMode,
    /// Quiet period after a manifest file change before it is read.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub manifests_debounce: Duration,
}

/// `--forwarding-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// bpf_redirect_neigh to the FIB's next hop (netfilter FORWARD bypassed).
    Redirect,
    /// Up the kernel's stack (netfilter FORWARD applies).
    Stack,
}

impl RunArgs {
    /// CONNTRACK map entries: --conntrack-max, else two (forward + reply)
    /// per flow of kube-proxy's nf_conntrack_max rule,
    /// max(--conntrack-max-per-core × `cpus`, --conntrack-min).
    pub fn conntrack_entries(&self, cpus: u32) -> u32 {
        self.conntrack_max.unwrap_or_else(|| {
            self.conntrack_max_per_core
                .saturating_mul(cpus)
                .max(self.conntrack_min)
                .saturating_mul(2)
        })
    }

    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default()
        })
    }
}

/// Our settings as camelCase keys: the older flat `--config` layout, and
/// the `LbAgentConfiguration` document next to a `KubeProxyConfiguration`
/// (there without the keys kube-proxy's document holds).
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(alias = "hostnameOverride")]
    pub node_name: Option<String>,
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub bpf_root: Option<PathBuf>,
    pub interfaces: Option<Vec<String>>,
    pub xdp_mode: Option<XdpModeArg>,
    pub xdp_interfaces: Option<Vec<String>>,
    pub xdp_redirect_interfaces: Option<Vec<String>>,
    pub max_services: Option<u32>,
    pub max_backends: Option<u32>,
    pub lb_algorithm: Option<String>,
    pub maglev_table_size: Option<u32>,
    pub conntrack_max: Option<u32>,
    pub conntrack_max_per_core: Option<u32>,
    pub conntrack_min: Option<u32>,
    pub conntrack_tcp_timeout_established: Option<String>,
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    pub conntrack_tcp_timeout_close: Option<String>,
    pub conntrack_tcp_timeout_syn: Option<String>,
    pub conntrack_udp_timeout: Option<String>,
    pub conntrack_udp_timeout_stream: Option<String>,
    pub conntrack_gc_interval: Option<String>,
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
    pub manifests_debounce: Option<String>,
    pub nodeport_addresses: Option<Vec<String>>,
    pub cluster_cidr: Option<Vec<String>>,
    pub service_cluster_ip_range: Option<Vec<String>>,
    pub cgroup_root: Option<PathBuf>,
    pub cleanup_on_exit: Option<bool>,
    pub metrics_per_backend: Option<bool>,
    pub masquerade_all: Option<bool>,
    pub forwarding_mode: Option<ForwardingMode>,
    pub metrics_bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
}

impl ConfigFile {
    /// Every setting of `args` (the effective configuration).
    pub fn from_args(a: &RunArgs) -> Self {
        fn strings<T: ToString>(v: &[T]) -> Option<Vec<String>> {
            Some(v.iter().map(ToString::to_string).collect())
        }
        let duration = |d: Duration| Some(format_duration(d));
        ConfigFile {
            node_name: a.node_name.clone(),
            manifests: a.manifests.clone(),
            kubeconfig: a.kubeconfig.clone(),
            master: a.master.as_ref().map(ToString::to_string),
            bpf_root: Some(a.bpf_root.clone()),
            interfaces: a.interfaces.clone(),
            xdp_mode: Some(a.xdp_mode),
            xdp_interfaces: Some(a.xdp_interfaces.clone()),
            xdp_redirect_interfaces: Some(a.xdp_redirect_interfaces.clone()),
            max_services: Some(a.max_services),
            max_backends: Some(a.max_backends),
            lb_algorithm: Some(a.lb_algorithm.clone()),
            maglev_table_size: Some(a.maglev_table_size),
            conntrack_max: a.conntrack_max,
            conntrack_max_per_core: Some(a.conntrack_max_per_core),
            conntrack_min: Some(a.conntrack_min),
            conntrack_tcp_timeout_established: duration(a.conntrack_tcp_timeout_established),
            conntrack_tcp_timeout_close_wait: duration(a.conntrack_tcp_timeout_close_wait),
            conntrack_tcp_timeout_close: duration(a.conntrack_tcp_timeout_close),
            conntrack_tcp_timeout_syn: duration(a.conntrack_tcp_timeout_syn),
            conntrack_udp_timeout: duration(a.conntrack_udp_timeout),
            conntrack_udp_timeout_stream: duration(a.conntrack_udp_timeout_stream),
            conntrack_gc_interval: duration(a.conntrack_gc_interval),
            min_sync_period: duration(a.min_sync_period),
            sync_period: duration(a.sync_period),
            manifests_debounce: duration(a.manifests_debounce),
            nodeport_addresses: strings(&a.nodeport_addresses),
            cluster_cidr: strings(&a.cluster_cidr),
            service_cluster_ip_range: strings(&a.service_cluster_ip_range),
            cgroup_root: a.cgroup_root.clone(),
            cleanup_on_exit: Some(a.cleanup_on_exit),
            metrics_per_backend: Some(a.metrics_per_backend),
            masquerade_all: Some(a.masquerade_all),
            forwarding_mode: Some(a.forwarding_mode),
            metrics_bind_address: Some(a.metrics_bind_address.clone()),
            healthz_bind_address: Some(a.healthz_bind_address.clone()),
            bind_address_hard_fail: Some(a.bind_address_hard_fail),
        }
    }
}

/// What `--config` decided beyond the run flags: logging settings the
/// file gives (the command line's --v / --logging-format win over them,
/// as in kube-proxy), and notes to log once logging is set up (fields that
/// do not apply here, flags the file overrode).
#[derive(Debug, Default)]
pub struct ConfigOutcome {
    pub verbosity: Option<u8>,
    pub logging_format: Option<LoggingFormat>,
    pub notes: Vec<String>,
}

impl RunArgs {
    /// Applies `--config`. kube-proxy's layout (a document with `kind:`):
    /// the file's values replace the flags, except those kube-proxy lets
    /// win ([`crate::kube_proxy_config::FLAGS_OVER_FILE`]); the flat
    /// layout fills only flags not given on the command line.
    pub fn merge_config_file(&mut self, matches: &clap::ArgMatches) -> anyhow::Result<ConfigOutcome> {
        use anyhow::Context;
        let Some(path) = self.config.clone() else {
            return Ok(ConfigOutcome::default());
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading --config {}", path.display()))?;
        let source = format!("--config {}", path.display());
        let from_cli = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        if let Some(loaded) = crate::kube_proxy_config::load(&text).with_context(|| format!("parsing {source}"))? {
            let mut outcome = loaded.outcome;
            // As kube-proxy: the file replaces the flags (defaults where it
            // is silent), but for the flags kube-proxy exempts.
            let mut fresh = RunArgs::defaults();
            for arg in matches.ids() {
                let id = arg.as_str();
                if !from_cli(id) {
                    continue;
                }
                // The flattened struct's own group id is no flag.
                let group = <RunArgs as clap::Args>::group_id();
                if crate::kube_proxy_config::FLAGS_OVER_FILE.contains(&id) || group.as_ref() == Some(arg) {
                    continue;
                }
                outcome.notes.push(format!(
                    "flag --{} ignored: with a KubeProxyConfiguration in --config the file wins (kube-proxy's rule)",
                    id.replace('_', "-")
                ));
            }
            fresh.config = self.config.take();
            fresh.write_config_to = self.write_config_to.take();
            fresh.master = self.master.take();
            let node_name_from_cli = from_cli("node_name").then(|| self.node_name.take());
            *self = fresh;
            self.apply(loaded.settings, &|_| false, &source)?;
            if let Some(node_name) = node_name_from_cli {
                self.node_name = node_name;
            }
            return Ok(outcome);
        }
        let file: ConfigFile = serde_norway::from_str(&text).with_context(|| format!("parsing {source}"))?;
        self.apply(file, &from_cli, &source)?;
        Ok(ConfigOutcome::default())
    }

    /// The run flags' defaults.
    pub(crate) fn defaults() -> RunArgs {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command()
            .try_get_matches_from(["lb-agent", "run"])
            .expect("the run flags' defaults parse");
        match Cli::from_arg_matches(&matches)
            .expect("the run flags' defaults parse")
            .command
        {
            Command::Run(args) => *args,
            _ => unreachable!("parsed `run`"),
        }
    }

    /// Sets every flag the file gives and `keep` does not hold back.
    fn apply(&mut self, file: ConfigFile, keep: &dyn Fn(&str) -> bool, source: &str) -> anyhow::Result<()> {
        let duration = |key: &str, v: &str| parse_duration(v).map_err(|e| anyhow::anyhow!("{source}: {key}: {e}"));
        macro_rules! take {
            ($field:ident) => {
                if !keep(stringify!($field))
                    && let Some(v) = file.$field
                {
                    self.$field = v.into();
                }
            };
            ($field:ident, duration) => {
                if !keep(stringify!($field))
                    && let Some(v) = file.$field
                {
                    self.$field = duration(stringify!($field), &v)?;
                }
            };
            ($field:ident, $parse:expr) => {
                if !keep(stringify!($field))
                    && let Some(v) = file.$field
                {
                    self.$field = $parse(&v)
                        .map_err(|e| anyhow::anyhow!("{source}: {}: {e}", stringify!($field)))?
                        .into();
                }
            };
        }
        let cidrs = |list: &Vec<String>| -> Result<Vec<Cidr>, String> { list.iter().map(|c| c.parse()).collect() };
        let nodeport =
            |list: &Vec<String>| -> Result<Vec<NodePortAddress>, String> { list.iter().map(|c| c.parse()).collect() };
        let algorithm = |v: &String| match v.as_str() {
            "random" | "maglev" => Ok(v.clone()),
            _ => Err(format!("{v:?}: expected random or maglev")),
        };
        let prime = |v: &u32| parse_prime(&v.to_string());
        take!(node_name);
        take!(manifests);
        take!(kubeconfig);
        take!(master, |v: &String| parse_master(v));
        take!(bpf_root);
        take!(interfaces);
        take!(xdp_mode);
        take!(xdp_interfaces);
        take!(xdp_redirect_interfaces);
        take!(max_services);
        take!(max_backends);
        take!(lb_algorithm, algorithm);
        take!(maglev_table_size, prime);
        take!(conntrack_max);
        take!(conntrack_max_per_core);
        take!(conntrack_min);
        take!(conntrack_tcp_timeout_established, duration);
        take!(conntrack_tcp_timeout_close_wait, duration);
        take!(conntrack_tcp_timeout_close, duration);
        take!(conntrack_tcp_timeout_syn, duration);
        take!(conntrack_udp_timeout, duration);
        take!(conntrack_udp_timeout_stream, duration);
        take!(conntrack_gc_interval, duration);
        take!(min_sync_period, duration);
        take!(sync_period, duration);
        take!(manifests_debounce, duration);
        take!(nodeport_addresses, nodeport);
        take!(cluster_cidr, cidrs);
        take!(service_cluster_ip_range, cidrs);
        take!(cgroup_root);
        take!(cleanup_on_exit);
        take!(metrics_per_backend);
        take!(masquerade_all);
        take!(forwarding_mode);
        take!(metrics_bind_address);
        take!(healthz_bind_address);
        take!(bind_address_hard_fail);
        if self.manifests.is_some() && (self.kubeconfig.is_some() || self.master.is_some()) {
            anyhow::bail!("--manifests excludes --kubeconfig and --master (check {source})");
        }
        Ok(())
    }
}

/// A duration as kube-proxy writes one (`1h0m0s` style, shortest form): `0s`, `250ms`, `1m30s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

/// An API server address: http(s)://HOST[:PORT] (kube-proxy's --master).
fn parse_master(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?}: {e} (expected https://HOST:PORT)"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(_)) => Ok(uri),
        _ => Err(format!("{s:?}: expected https://HOST:PORT")),
    }
}

fn parse_prime(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if crate::maglev::is_prime(n) && n > 2 {
        Ok(n)
    } else {
        Err(format!("{n} is not a prime (try 251, 1021, 4093, 16381, 65521)"))
    }
}

/// Go-style durations as kube-proxy takes them: `0`, `250ms`, `1s`, `2m`, `1h`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: expected a duration like 250ms, 1s or 2m"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h)")),
        };
        total += unit;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn run_args(argv: &[&str], config: &str) -> anyhow::Result<RunArgs> {
        run_config(argv, config).map(|(args, _)| args)
    }

    /// `lb-agent run --config FILE ARGV…` with `config` in FILE: the merged
    /// flags and what `--config` reported.
    pub(crate) fn run_config(argv: &[&str], config: &str) -> anyhow::Result<(RunArgs, ConfigOutcome)> {
        use clap::{CommandFactory, FromArgMatches};
        let dir = std::env::temp_dir().join(format!(
            "lb-config-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("config.yaml");
        std::fs::write(&path, config)?;
        let mut full = vec!["lb-agent", "run", "--config", path.to_str().unwrap()];
        full.extend(argv);
        let matches = Cli::command().try_get_matches_from(full)?;
        let Command::Run(mut args) = Cli::from_arg_matches(&matches)?.command else {
            unreachable!()
        };
        let outcome = args.merge_config_file(matches.subcommand_matches("run").unwrap())?;
        Ok((*args, outcome))
    }

    #[test]
    fn config_file_fills_flags_and_command_line_wins() {
        let args = run_args(
            &["--sync-period", "5s"],
            "minSyncPeriod: 250ms\nsyncPeriod: 1m\nhostnameOverride: n1\nconntrackMax: 1024\n",
        )
        .unwrap();
        assert_eq!(args.min_sync_period, Duration::from_millis(250));
        assert_eq!(args.sync_period, Duration::from_secs(5), "the flag wins");
        assert_eq!(args.node_name.as_deref(), Some("n1"));
        assert_eq!(args.conntrack_max, Some(1024));
        let err = run_args(&[], "minSyncPeriod: soon\n").unwrap_err().to_string();
        assert!(
            err.contains("minSyncPeriod") || err.contains("min_sync_period"),
            "{err}"
        );
        assert!(run_args(&[], "bogusKey: 1\n").is_err(), "unknown keys are refused");
    }

    #[test]
    fn conntrack_defaults_and_sizing_follow_kube_proxy() {
        let args = run_args(&[], "").unwrap();
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(args.conntrack_tcp_timeout_established, hours(24));
        assert_eq!(args.conntrack_tcp_timeout_close_wait, hours(1));
        assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(30));
        assert_eq!(args.conntrack_udp_timeout_stream, Duration::from_secs(120));
        // Two entries (forward + reply) per flow; max(per core × CPUs, min) flows.
        assert_eq!(args.conntrack_entries(2), 2 * 131_072, "the minimum wins on 2 CPUs");
        assert_eq!(args.conntrack_entries(8), 2 * 8 * 32_768);
        let args = run_args(
            &["--conntrack-min", "1000"],
            "conntrackMaxPerCore: 0\nconntrackMin: 5\nconntrackUdpTimeoutStream: 5m\nconntrackTcpTimeoutCloseWait: 30m\n",
        )
        .unwrap();
        assert_eq!(args.conntrack_entries(4), 2_000, "per core 0: the minimum alone");
        assert_eq!(args.conntrack_udp_timeout_stream, Duration::from_secs(300));
        assert_eq!(args.conntrack_tcp_timeout_close_wait, Duration::from_secs(1800));
        let args = run_args(&["--conntrack-max", "4096"], "").unwrap();
        assert_eq!(args.conntrack_entries(64), 4096, "--conntrack-max overrides");
    }

    #[test]
    fn forwarding_mode_from_flag_or_config() {
        assert_eq!(run_args(&[], "").unwrap().forwarding_mode, ForwardingMode::Redirect);
        let args = run_args(&[], "forwardingMode: stack\n").unwrap();
        assert_eq!(args.forwarding_mode, ForwardingMode::Stack);
        let args = run_args(&["--forwarding-mode", "redirect"], "forwardingMode: stack\n").unwrap();
        assert_eq!(args.forwarding_mode, ForwardingMode::Redirect, "the flag wins");
        assert!(
            run_args(&[], "forwardingMode: bypass\n").is_err(),
            "unknown mode refused"
        );
    }

    #[test]
    fn xdp_settings_and_the_deploy_config_parse() {
        let args = run_args(
            &[],
            "xdpMode: native\nxdpInterfaces: [eth0]\nxdpRedirectInterfaces: ['veth*']\n",
        )
        .unwrap();
        assert_eq!(args.xdp_mode, XdpModeArg::Native);
        assert_eq!(args.xdp_interfaces, ["eth0"]);
        assert_eq!(args.xdp_redirect_interfaces, ["veth*"]);
        assert!(run_args(&[], "xdpMode: fast\n").is_err(), "unknown XDP mode refused");
        // The DaemonSet's config file (its ConfigMap, generated by kustomize).
        let args = run_args(&[], include_str!("../../deploy/config.yaml")).unwrap();
        assert_eq!(args.xdp_mode, XdpModeArg::Off);
    }

    #[test]
    fn verbosity_maps_klog_levels_and_is_accepted_after_the_subcommand() {
        let level = |argv: &[&str]| {
            Cli::try_parse_from(argv)
                .map(|c| c.log_level())
                .map_err(|e| e.to_string())
        };
        assert_eq!(level(&["lb-agent", "stats"]), Ok("info"));
        assert_eq!(level(&["lb-agent", "--v=2", "stats"]), Ok("debug"));
        assert_eq!(level(&["lb-agent", "run", "-v", "6"]), Ok("trace"));
        assert!(level(&["lb-agent", "stats", "--v", "loud"]).is_err());
    }

    #[test]
    fn logging_flags_win_over_the_config_files_logging() {
        use clap::CommandFactory;
        let outcome = ConfigOutcome {
            verbosity: Some(4),
            logging_format: Some(LoggingFormat::Json),
            notes: vec![],
        };
        let logging =
            |argv: &[&str]| Cli::config_logging(&outcome, &Cli::command().try_get_matches_from(argv).unwrap());
        assert_eq!(logging(&["lb-agent", "run"]), (Some(4), Some(LoggingFormat::Json)));
        assert_eq!(
            logging(&["lb-agent", "--v=2", "run"]),
            (None, Some(LoggingFormat::Json))
        );
        assert_eq!(
            logging(&["lb-agent", "run", "--logging-format", "text", "-v", "0"]),
            (None, None),
            "given after the subcommand too"
        );
    }

    #[test]
    fn durations_parse_like_kube_proxy_flags() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("1d").is_err());
    }
}
