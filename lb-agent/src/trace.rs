//! `lb-agent trace`: one crafted packet through the loaded program, on the
//! live maps, with BPF_PROG_TEST_RUN — the `iptables -vnL` walk of the seed
//! made exact: which frontend matched, which backend was chosen, what NAT
//! was applied, or why the packet was dropped. Nothing is sent; the
//! conntrack entries the packet created are removed again (its counters
//! and a ClientIP affinity entry stay). Run it in the node's network
//! namespace for the node's routing (`nsenter --net=...`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::{Context, bail};
use aya::programs::{TestRun, TestRunOptions};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{CtKey, CtKind, DropReason, addr::from_v4_word, map_names, proto};
use serde::Serialize;

use crate::datapath::{Datapath, LoadOptions};
use crate::model::Protocol;

#[derive(Debug, Serialize)]
pub struct Trace {
    pub verdict: &'static str,
    pub frontend: Option<String>,
    pub drop_reason: Option<&'static str>,
    /// The packet as it left the program.
    pub out_src: Option<String>,
    pub out_dst: Option<String>,
    pub masqueraded: bool,
}

fn packet(src: SocketAddrV4, dst: SocketAddrV4, protocol: u8) -> anyhow::Result<Vec<u8>> {
    let b =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.ip().octets(), dst.ip().octets(), 64);
    let mut out = Vec::new();
    match protocol {
        proto::TCP => b.tcp(src.port(), dst.port(), 1, 64240).syn().write(&mut out, &[])?,
        proto::UDP => b.udp(src.port(), dst.port()).write(&mut out, b"trace")?,
        proto::SCTP => b.write(&mut out, etherparse::IpNumber::SCTP, &sctp_init(src.port(), dst.port()))?,
        _ => bail!("--proto must be tcp, udp or sctp"),
    }
    Ok(out)
}

/// An SCTP packet with one INIT chunk (no parameters) and its CRC32c.
fn sctp_init(sport: u16, dport: u16) -> Vec<u8> {
    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut p = [&sport.to_be_bytes()[..], &dport.to_be_bytes(), &[0; 8]].concat();
    // Type 1, flags, length 20; initiate tag, a_rwnd, streams, initial TSN.
    p.extend([1, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    let crc = CASTAGNOLI.checksum(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

pub fn trace(bpf_root: &Path, src: SocketAddrV4, dst: SocketAddrV4, protocol: u8) -> anyhow::Result<Trace> {
    if !bpf_root.join(map_names::SERVICES).exists() {
        bail!("no agent's maps under {} (is --bpf-root right?)", bpf_root.display());
    }
    let mut dp = Datapath::load_existing(&LoadOptions::new(Some(bpf_root.to_path_buf()), 0))?;
    let input = packet(src, dst, protocol)?;
    let fwd_key = CtKey {
        src_addr: from_v4_word(u32::from_ne_bytes(src.ip().octets())),
        dst_addr: from_v4_word(u32::from_ne_bytes(dst.ip().octets())),
        src_port: src.port(),
        dst_port: dst.port(),
        proto: protocol,
        kind: CtKind::Forward as u8,
        _pad: [0; 2],
    };
    let existed = dp.maps.conntrack.get(&fwd_key, 0).is_ok();
    let drops_before: Vec<u64> = DropReason::ALL.iter().map(|r| dp.maps.drops(*r).unwrap_or(0)).collect();
    let frontend = lb_common::ServiceKey {
        addr: fwd_key.dst_addr,
        port: dst.port(),
        proto: protocol,
        scope: 0,
    };
    let matched = dp
        .maps
        .services
        .get(&frontend, 0)
        .ok()
        .filter(|v| v.flags & lb_common::svc_flags::ADDRESS_ONLY == 0);

    let mut out = vec![0u8; input.len() + 256];
    let result = dp
        .ingress_program()?
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);

    // Undo the flow the traced packet created.
    if !existed && let Ok(entry) = dp.maps.conntrack.get(&fwd_key, 0) {
        let masq = entry.flags & lb_common::conntrack::entry_flags::SNAT != 0;
        let (to_addr, to_port) = if masq {
            (entry.snat_addr, entry.snat_port)
        } else {
            (fwd_key.src_addr, src.port())
        };
        let reply = CtKey {
            src_addr: entry.nat_addr,
            dst_addr: to_addr,
            src_port: entry.nat_port,
            dst_port: to_port,
            proto: protocol,
            kind: CtKind::Reply as u8,
            _pad: [0; 2],
        };
        let _ = dp.maps.conntrack.remove(&reply);
        let _ = dp.maps.conntrack.remove(&fwd_key);
    }

    let drop_reason = DropReason::ALL
        .iter()
        .zip(&drops_before)
        .find(|(r, before)| dp.maps.drops(**r).unwrap_or(0) > **before)
        .map(|(r, _)| r.name());
    let verdict = match result.return_value {
        0 => "pass",
        2 => "drop",
        7 => "forward (redirect)",
        _ => "other",
    };
    let (mut out_src, mut out_dst) = (None, None);
    if let Ok(sliced) = SlicedPacket::from_ethernet(&out)
        && let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net
    {
        let (s, d) = (ip.header().source_addr(), ip.header().destination_addr());
        let ports = match &sliced.transport {
            Some(TransportSlice::Tcp(t)) => Some((t.source_port(), t.destination_port())),
            Some(TransportSlice::Udp(u)) => Some((u.source_port(), u.destination_port())),
            // etherparse has no SCTP: its ports lead the IP payload.
            _ if protocol == proto::SCTP => match ip.payload().payload {
                [s0, s1, d0, d1, ..] => Some((u16::from_be_bytes([*s0, *s1]), u16::from_be_bytes([*d0, *d1]))),
                _ => None,
            },
            _ => None,
        };
        (out_src, out_dst) = match ports {
            Some((sp, dp)) => (Some(format!("{s}:{sp}")), Some(format!("{d}:{dp}"))),
            None => (Some(s.to_string()), Some(d.to_string())),
        };
    }
    let masqueraded = out_src.as_deref().is_some_and(|s| s != src.to_string()) && verdict != "drop";
    Ok(Trace {
        verdict,
        frontend: matched.and_then(|_| Protocol::from_ip_proto(protocol).map(|p| format!("{dst}/{p}"))),
        drop_reason,
        out_src,
        out_dst,
        masqueraded,
    })
}

pub fn parse_endpoint(s: &str, default_port: u16) -> anyhow::Result<SocketAddrV4> {
    if let Ok(sa) = s.parse::<SocketAddrV4>() {
        return Ok(sa);
    }
    let ip: Ipv4Addr = s.parse().with_context(|| format!("{s:?}: expected IPv4[:PORT]"))?;
    Ok(SocketAddrV4::new(ip, default_port))
}
