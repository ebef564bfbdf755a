use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches};
use lb_agent::cli::{Cli, Command, LoggingFormat, Output};
use lb_agent::datapath::BpfMaps;
use lb_agent::inspect::{self, print};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches)?;
    // --config before logging: its `logging` section sets --v and
    // --logging-format where the command line does not (kube-proxy's rule).
    let mut config_notes = Vec::new();
    if let (Command::Run(args), Some(run_matches)) = (&mut cli.command, matches.subcommand_matches("run")) {
        let outcome = args.merge_config_file(run_matches)?;
        let (verbosity, logging_format) = Cli::config_logging(&outcome, &matches);
        cli.verbosity = verbosity.unwrap_or(cli.verbosity);
        cli.logging_format = logging_format.unwrap_or(cli.logging_format);
        config_notes = outcome.notes;
        if let Some(path) = &args.write_config_to {
            let text = lb_agent::kube_proxy_config::effective(args, cli.verbosity, cli.logging_format);
            std::fs::write(path, text).map_err(|e| anyhow::anyhow!("--write-config-to {}: {e}", path.display()))?;
            return Ok(());
        }
    }
    // RUST_LOG, when set, overrides --v (e.g. RUST_LOG=lb_agent::sync=trace).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(cli.log_level()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.logging_format {
        LoggingFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LoggingFormat::Json => logs.json().flatten_event(true).init(),
    }
    match cli.command {
        Command::Run(args) => {
            for note in config_notes {
                tracing::warn!("--config: {note}");
            }
            let result = lb_agent::run::run(*args).await;
            // Exit here, not by dropping the runtime: that would wait for a
            // manifests parse still running on a blocking thread (SIGTERM
            // during the initial read of 100,000 files must be prompt). The
            // datapath is pinned; nothing else needs tearing down.
            if let Err(e) = &result {
                eprintln!("Error: {e:?}");
            }
            std::process::exit(if result.is_ok() { 0 } else { 1 });
        }
        Command::Services(a) => print(&inspect::services(&BpfMaps::open_pinned(&a.bpf_root)?)?, a.output),
        Command::Stats(a) => print(&inspect::stats(&BpfMaps::open_pinned(&a.bpf_root)?)?, a.output),
        Command::Backends { frontend, inspect: a } => print(
            &inspect::backends_of(&BpfMaps::open_pinned(&a.bpf_root)?, &frontend)?,
            a.output,
        ),
        Command::Conntrack { service, inspect: a } => {
            let maps = BpfMaps::open_pinned(&a.bpf_root)?;
            let now = lb_agent::run::monotonic_secs();
            print(&inspect::conntrack(&maps, service.as_deref(), now)?, a.output)
        }
        Command::Trace {
            src,
            dst,
            proto,
            inspect: a,
        } => {
            let protocol = lb_agent::model::Protocol::parse(Some(&proto.to_uppercase()))
                .map_err(anyhow::Error::msg)?
                .ip_proto();
            let t = lb_agent::trace::trace(
                &a.bpf_root,
                lb_agent::trace::parse_endpoint(&src, 40000)?,
                lb_agent::trace::parse_endpoint(&dst, 0)?,
                protocol,
            )?;
            if a.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else if a.output == Output::Yaml {
                print!("{}", serde_norway::to_string(&t)?);
            } else {
                println!("verdict:     {}", t.verdict);
                println!(
                    "frontend:    {}",
                    t.frontend.as_deref().unwrap_or("<none: not a service>")
                );
                if let Some(r) = t.drop_reason {
                    println!("drop reason: {r}");
                }
                println!(
                    "out:         {} -> {}",
                    t.out_src.as_deref().unwrap_or("?"),
                    t.out_dst.as_deref().unwrap_or("?")
                );
                println!("masquerade:  {}", if t.masqueraded { "yes" } else { "no" });
            }
            Ok(())
        }
        Command::Status {
            metrics_address,
            inspect: a,
        } => print(&inspect::status(&a.bpf_root, metrics_address.as_deref())?, a.output),
        Command::Maps(a) => print(&inspect::maps_fill(&BpfMaps::open_pinned(&a.bpf_root)?), a.output),
        Command::Cleanup(args) => {
            // Our own datapath only when asked, or when nothing else is.
            let datapath = args.datapath || !args.cleanup_kube_proxy;
            let left = if datapath {
                lb_agent::datapath::load::remove_pins(&args.bpf_root)
            } else {
                Default::default()
            };
            let kube_proxy = if args.cleanup_kube_proxy {
                lb_agent::kube_proxy::cleanup().await
            } else {
                Ok(())
            };
            if !left.is_empty() {
                if let Err(e) = &kube_proxy {
                    tracing::error!("{e:#}");
                }
                anyhow::bail!(
                    "cleanup of {} incomplete, left: {left} (remove those by hand, or fix the cause and run cleanup again)",
                    args.bpf_root.display()
                );
            }
            kube_proxy?;
            if datapath {
                tracing::info!(bpf_root = %args.bpf_root.display(), "removed programs, links and pins");
            }
            if args.cleanup_kube_proxy {
                tracing::info!("removed kube-proxy's chains and tables");
            }
            if args.hold {
                tracing::info!("cleanup done; holding until stopped (delete the DaemonSet once every node shows this)");
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Ok(())
        }
    }
}
