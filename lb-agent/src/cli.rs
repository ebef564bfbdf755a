//! Command line.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF/XDP Kubernetes service load balancer (kube-proxy replacement)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Program the datapath from a source and keep it in sync.
    Run(RunArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// This node's name (as in the Node object and endpoints' nodeName).
    #[arg(long)]
    pub node_name: String,
    /// File or directory of Kubernetes YAML (Services, EndpointSlices, Nodes).
    #[arg(long)]
    pub manifests: PathBuf,
    /// Directory on a bpffs where the maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/lb-agent")]
    pub bpf_root: PathBuf,
    /// Interfaces to attach to (comma-separated); default: all but loopback,
    /// including interfaces created later.
    #[arg(long, value_delimiter = ',')]
    pub interfaces: Option<Vec<String>>,
    /// Conntrack table capacity (forward + reply entries).
    #[arg(long, default_value_t = lb_common::limits::DEFAULT_CONNTRACK_ENTRIES)]
    pub conntrack_max: u32,
    /// Quiet period after a manifest change before the sync runs.
    #[arg(long, default_value = "50ms", value_parser = humantime_ms)]
    pub sync_debounce: std::time::Duration,
}

fn humantime_ms(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "ms"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 50ms or 1s"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!("{s:?}: unit must be ms or s")),
    }
}
