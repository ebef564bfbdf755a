//! Project tasks: `cargo xtask setup | build | demo | test`.
//! The only place where shell-like orchestration lives.

mod bench;
mod demo;
mod plot;
mod setup;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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
    Setup {
        /// Only what building needs, nothing privileged (image builds).
        #[arg(long)]
        build_only: bool,
    },
    /// Build the release agent and its OCI image (FROM scratch: the binary
    /// and its shared libraries) with podman, pulling nothing.
    Image {
        /// Image name and tag.
        #[arg(long, default_value = concat!("localhost/lb-agent:", env!("CARGO_PKG_VERSION")))]
        tag: String,
        /// Only lay out the image's file system in DIR from the release
        /// agent already built (deploy/Dockerfile's build stage).
        #[arg(long, value_name = "DIR")]
        rootfs_only: Option<std::path::PathBuf>,
    },
    /// Setup, then build the agent (with its embedded eBPF object).
    Build,
    /// Build, then balance real requests in a network-namespace sandbox.
    Demo,
    /// Build, then compare this datapath with kube-proxy's iptables rules.
    Bench {
        /// Numbers of services to measure with (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 1000, 10000])]
        services: Vec<usize>,
        /// Seconds of load per case.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Only these datapaths (comma-separated): plain, ceiling, nft, legacy, tc, xdp.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Build, then run every test: unit, kernel program and netns end-to-end.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { build_only: false } => setup::run(),
        Task::Setup { build_only: true } => setup::build_prerequisites(),
        Task::Image {
            rootfs_only: Some(dir), ..
        } => lb_tests::image::assemble_rootfs(&release_agent(), &dir),
        Task::Image { tag, rootfs_only: None } => image(&tag),
        Task::Build => build(),
        Task::Demo => {
            build()?;
            demo::run()
        }
        Task::Bench {
            services,
            seconds,
            only,
        } => bench::run(&services, seconds, &only),
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

fn image(tag: &str) -> anyhow::Result<()> {
    setup::run()?;
    step("building the release agent");
    cmd("cargo", &["build", "--release", "--package", "lb-agent"])?;
    step(&format!(
        "building image {tag} (FROM scratch: the agent, its shared libraries, the cleanup tools)"
    ));
    let id = lb_tests::image::build(&release_agent(), tag)?;
    let latest = format!("{}:latest", tag.rsplit_once(':').map_or(tag, |(name, _)| name));
    lb_tests::image::podman(&["tag", &id, &latest])?;
    println!("built {tag} ({latest}), image {id}");
    println!(
        "deploy: set the image in deploy/kustomization.yaml, API_SERVER in deploy/params.env, then `kubectl apply -k deploy/`"
    );
    Ok(())
}

fn release_agent() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb-agent")
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::require_root("the tests load eBPF programs and create network namespaces")?;
    step("removing sandboxes left by interrupted runs");
    lb_tests::cleanup::sweep_stale("lbt-");
    let mut totals = TestTotals::default();
    step("running all tests (unit, kernel program via BPF_PROG_TEST_RUN, netns end-to-end)");
    let mut args = vec!["test", "--workspace", "--exclude", "lb-ebpf", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    let all_ok = cargo_test(&args, &mut totals)?;
    // The scale test runs alone (it wants the machine to itself) and shows
    // its measurements; it is `#[ignore]`d in the run above.
    let scale_ok = if extra.is_empty() {
        step("scale test: 10,000 services x 10 endpoints through the fake API server");
        cargo_test(
            &[
                "test",
                "--package",
                "lb-tests",
                "--test",
                "scale",
                "--",
                "--ignored",
                "--show-output",
            ],
            &mut totals,
        )?
    } else {
        true
    };
    // One closing line for the whole run (cargo prints one per test binary).
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !all_ok || !scale_ok || totals.failed > 0 {
        bail!("tests failed: see the failures above (rerun one with `cargo xtask test NAME`)");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Runs `cargo ARGS`, echoing and counting its test results; true on success.
fn cargo_test(args: &[&str], totals: &mut TestTotals) -> anyhow::Result<bool> {
    let mut child = Command::new("cargo")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    Ok(child.wait()?.success())
}

/// Sums cargo's `test result: ok. N passed; M failed; K ignored; …` lines.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

pub fn step(what: &str) {
    eprintln!("==> {what}");
}
