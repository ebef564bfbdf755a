use std::io::IsTerminal;

use clap::Parser;
use lb_agent::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => lb_agent::run::run(args).await,
        Command::Services(args) => lb_agent::inspect::print_services(&args.bpf_root, &args.output),
    }
}
