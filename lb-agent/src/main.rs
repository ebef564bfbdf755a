use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches};
use lb_agent::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Run(mut args) => {
            if let Some(run_matches) = matches.subcommand_matches("run") {
                args.merge_config_file(run_matches)?;
            }
            lb_agent::run::run(*args).await
        }
        Command::Services(args) => lb_agent::inspect::print_services(&args.bpf_root, &args.output),
        Command::Cleanup(args) => {
            lb_agent::datapath::load::remove_pins(&args.bpf_root);
            tracing::info!(bpf_root = %args.bpf_root.display(), "removed programs, links and pins");
            Ok(())
        }
    }
}
