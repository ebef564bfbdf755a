//! Project tasks: `cargo xtask setup | build | demo | test`.
//! The only place where shell-like orchestration lives.

mod demo;
mod setup;

use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Setup, then build the agent (with its embedded eBPF object).
    Build,
    /// Build, then balance real requests in a network-namespace sandbox.
    Demo,
    /// Build, then run every test: unit, kernel program and netns end-to-end.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => build(),
        Task::Demo => {
            build()?;
            demo::run()
        }
        Task::Test { args } => {
            build()?;
            test(&args)
        }
    }
}

/// Runs a command, streaming its output; fails with what to do next.
pub fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    setup::run()?;
    step("building lb-agent (and its eBPF programs)");
    cmd("cargo", &["build", "--package", "lb-agent"])
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::require_root("the tests load eBPF programs and create network namespaces")?;
    step("removing sandboxes left by interrupted runs");
    lb_tests::cleanup::sweep_stale("lbt-");
    step("running all tests (unit, kernel program via BPF_PROG_TEST_RUN, netns end-to-end)");
    let mut args = vec!["test", "--workspace", "--exclude", "lb-ebpf"];
    args.extend(extra.iter().map(String::as_str));
    cmd("cargo", &args)
}

pub fn step(what: &str) {
    eprintln!("==> {what}");
}
