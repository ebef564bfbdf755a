//! `lb-bench`: the kernel-side tools of `cargo xtask bench`, not part of the
//! agent's job. `pps` floods a NodePort with new UDP flows from an XDP
//! live-frame generator and counts what reaches the pods; `cost` times the
//! agent's programs per packet with BPF_PROG_TEST_RUN on the live maps.
//! Prints one JSON object.

use std::fs::File;
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aya::maps::{Array, DevMap, MapData, PerCpuArray};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, include_bytes_aligned};
use clap::{Parser, Subcommand};
use etherparse::PacketBuilder;
use lb_agent::datapath::{Datapath, LoadOptions};

static BENCH_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// UDP packets per second to `--to`, each a new flow, generated in the
    /// client namespace; counted where they end (the `--sink` interfaces).
    Pps(PpsArgs),
    /// Nanoseconds per packet of lb_ingress (TC) or lb_xdp on the maps
    /// pinned under --bpf-root. Run it in the node's namespace.
    Cost(CostArgs),
}

#[derive(clap::Args)]
struct Frame {
    /// First source (the generator counts the port, then the address up).
    #[arg(long)]
    from: SocketAddrV4,
    #[arg(long)]
    to: SocketAddrV4,
    #[arg(long)]
    src_mac: String,
    #[arg(long)]
    dst_mac: String,
}

#[derive(clap::Args)]
struct PpsArgs {
    #[command(flatten)]
    frame: Frame,
    /// Network namespace (path) and interface the frames are sent out of.
    #[arg(long)]
    client_netns: PathBuf,
    #[arg(long)]
    client_if: String,
    /// NETNS_PATH:IFNAME where frames are counted and dropped (repeatable).
    #[arg(long, required = true)]
    sink: Vec<String>,
    /// NETNS_PATH:FROM_IF:TO_IF:DST_MAC:SRC_MAC — run the bare-redirect
    /// ceiling instead of whatever the node does: every frame from FROM_IF
    /// straight to TO_IF.
    #[arg(long)]
    ceiling: Option<String>,
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

#[derive(clap::Args)]
struct CostArgs {
    #[command(flatten)]
    frame: Frame,
    #[arg(long)]
    bpf_root: PathBuf,
    /// Time lb_xdp (as received on --ingress-if) instead of lb_ingress.
    #[arg(long)]
    xdp: bool,
    #[arg(long)]
    ingress_if: Option<String>,
    /// Packets timed; each a new flow with --new-flows, else all one flow.
    #[arg(long, default_value_t = 20_000)]
    packets: u32,
    #[arg(long)]
    new_flows: bool,
}

fn mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
}

/// An Ethernet/IPv4/UDP frame without UDP checksum (what bench_pktgen expects).
fn udp_frame(f: &Frame, sport: u16) -> anyhow::Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2(mac(&f.src_mac)?, mac(&f.dst_mac)?)
        .ipv4(f.from.ip().octets(), f.to.ip().octets(), 64)
        .udp(sport, f.to.port());
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 18])?;
    // UDP checksum 0: none.
    out[40] = 0;
    out[41] = 0;
    Ok(out)
}

/// Runs `f` on a thread inside the network namespace at `netns` (ifindexes
/// in syscalls are resolved in the caller's namespace).
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on this thread only; the fd is open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", netns.display()))?
    })
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name} here"),
        i => Ok(i),
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let p: &mut Xdp = ebpf.program_mut(name).context(name.to_string())?.try_into()?;
    if p.fd().is_err() {
        p.load().with_context(|| format!("verifying {name}"))?;
    }
    Ok(p)
}

/// Attaches `name` to `ifname` in `netns` (native mode); the link lives
/// as long as `ebpf`.
fn attach_in(ebpf: &mut Ebpf, name: &str, netns: &Path, ifname: &str) -> anyhow::Result<u32> {
    let prog = program(ebpf, name)?;
    in_netns(netns, || -> anyhow::Result<u32> {
        let index = ifindex(ifname)?;
        prog.attach_to_if_index(index, XdpMode::Driver)
            .with_context(|| format!("attaching {name} to {ifname} in {}", netns.display()))?;
        Ok(index)
    })?
}

fn sink_total(counts: &PerCpuArray<MapData, u64>) -> anyhow::Result<u64> {
    Ok(counts.get(&0, 0)?.iter().sum())
}

fn pps(args: PpsArgs) -> anyhow::Result<serde_json::Value> {
    let mut ebpf = Ebpf::load(BENCH_OBJECT).context("loading the bench object")?;
    let counts: PerCpuArray<MapData, u64> = PerCpuArray::try_from(ebpf.take_map("SINK_COUNT").context("SINK_COUNT")?)?;
    for sink in &args.sink {
        let (netns, ifname) = sink.rsplit_once(':').context("--sink NETNS:IF")?;
        attach_in(&mut ebpf, "bench_sink", Path::new(netns), ifname)?;
    }
    if let Some(spec) = &args.ceiling {
        let parts: Vec<&str> = spec.splitn(3, ':').collect();
        let [netns, from, rest] = parts[..] else {
            bail!("--ceiling NETNS:FROM:TO:DST_MAC:SRC_MAC")
        };
        let (to, macs) = rest
            .split_once(':')
            .context("--ceiling NETNS:FROM:TO:DST_MAC:SRC_MAC")?;
        let (dst, src) = macs.split_at(17);
        let mut header = [0u8; 12];
        header[..6].copy_from_slice(&mac(dst)?);
        header[6..].copy_from_slice(&mac(src.trim_start_matches(':'))?);
        let mut target: DevMap<_> = DevMap::try_from(ebpf.map_mut("REDIRECT_TO").context("REDIRECT_TO")?)?;
        in_netns(Path::new(netns), || -> anyhow::Result<()> {
            target.set(0, ifindex(to)?, None, 0)?;
            Ok(())
        })??;
        let mut macs: Array<_, [u8; 12]> = Array::try_from(ebpf.map_mut("REDIRECT_MACS").context("REDIRECT_MACS")?)?;
        macs.set(0, header, 0)?;
        attach_in(&mut ebpf, "bench_redirect", Path::new(netns), from)?;
    }
    let frame = udp_frame(&args.frame, args.frame.from.port())?;
    let mut template: Array<_, [u8; 42]> =
        Array::try_from(ebpf.map_mut("PKTGEN_TEMPLATE").context("PKTGEN_TEMPLATE")?)?;
    template.set(0, <[u8; 42]>::try_from(&frame[..42])?, 0)?;
    let client_index = in_netns(&args.client_netns, || ifindex(&args.client_if))??;
    let generator = program(&mut ebpf, "bench_pktgen")?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, client_index, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let send = |generator: &mut Xdp, seconds: f64| -> anyhow::Result<u64> {
        const BATCH: u32 = 64;
        const PER_CALL: u32 = 100_000;
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let mut sent = 0u64;
        while Instant::now() < deadline {
            generator.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: PER_CALL,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..Default::default()
            })?;
            sent += PER_CALL as u64;
        }
        Ok(sent)
    };
    // The generator sends from inside the client namespace: the frames
    // leave through the ingress device given by ifindex there.
    let (warm, measured, received) = in_netns(&args.client_netns, || -> anyhow::Result<_> {
        // Warm-up: neighbours, first flows through the slow path.
        let warm = send(generator, 0.3)?;
        std::thread::sleep(Duration::from_millis(100));
        let before = sink_total(&counts)?;
        let started = Instant::now();
        let sent = send(generator, args.seconds)?;
        let took = started.elapsed();
        // Let in-flight frames land.
        std::thread::sleep(Duration::from_millis(100));
        Ok((warm, (sent, took), sink_total(&counts)? - before))
    })??;
    let (sent, took) = measured;
    Ok(serde_json::json!({
        "warmup_sent": warm,
        "sent": sent,
        "received": received,
        "seconds": took.as_secs_f64(),
        "sent_pps": sent as f64 / took.as_secs_f64(),
        "received_pps": received as f64 / took.as_secs_f64(),
    }))
}

fn cost(args: CostArgs) -> anyhow::Result<serde_json::Value> {
    let mut dp = Datapath::load_existing(&LoadOptions::new(Some(args.bpf_root.clone()), 0))?;
    let ingress = match &args.ingress_if {
        Some(name) => ifindex(name)?,
        None if args.xdp => bail!("--xdp needs --ingress-if (the FIB lookup starts there)"),
        None => 0,
    };
    let (mut total_ns, mut last_action) = (0u64, 0u32);
    for i in 0..args.packets {
        let sport = if args.new_flows {
            args.frame.from.port().wrapping_add(i as u16)
        } else {
            args.frame.from.port()
        };
        let frame = udp_frame(&args.frame, sport)?;
        let mut out = vec![0u8; frame.len() + 64];
        let result = if args.xdp {
            let ctx: Vec<u8> = [0, frame.len() as u32, 0, ingress, 0, 0]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            dp.xdp_program()?.test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })?
        } else {
            dp.ingress_program()?.test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..Default::default()
            })?
        };
        total_ns += result.duration.as_nanos() as u64;
        last_action = result.return_value;
    }
    Ok(serde_json::json!({
        "program": if args.xdp { "lb_xdp" } else { "lb_ingress" },
        "packets": args.packets,
        "ns_per_packet": total_ns as f64 / args.packets as f64,
        "last_action": last_action,
    }))
}

fn main() -> anyhow::Result<()> {
    let out = match Cli::parse().command {
        Command::Pps(a) => pps(a)?,
        Command::Cost(a) => cost(a)?,
    };
    println!("{out}");
    Ok(())
}
