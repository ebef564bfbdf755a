//! Programs for `cargo xtask bench` only (a separate object, never loaded by
//! the agent): a packet generator, a bare-redirect ceiling and a packet sink;
//! and the CRC32c recomputation the datapath's incremental SCTP update is
//! measured against (lb-agent's datapath tests).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    btf_maps::{Array, DevMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Ethernet + IPv4 (no options) + UDP: where the generator's fields are.
const IP_CSUM: usize = 24;
const IP_SRC_LAST: usize = 29;
const UDP_SPORT: usize = 34;
const FRAME_MIN: usize = 42;

/// bench_redirect's target (index 0) ...
#[btf_map]
static REDIRECT_TO: DevMap<1> = DevMap::new();

/// ... and the Ethernet header it writes: destination MAC then source MAC.
#[btf_map]
static REDIRECT_MACS: Array<[u8; 12], 1> = Array::new();

/// Frames bench_sink received (per CPU).
#[btf_map]
static SINK_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

/// The generator's frame headers (Ethernet + IPv4 + UDP, checksum 0).
#[btf_map]
static PKTGEN_TEMPLATE: Array<[u8; FRAME_MIN], 1> = Array::new();

/// Frames generated so far (per CPU): which flow the next one is.
#[btf_map]
static PKTGEN_FLOWS: PerCpuArray<u32, 1> = PerCpuArray::new();

/// Source ports per source address.
const PORTS: u32 = 65536 - 1024;

/// Live-frame generator (BPF_PROG_TEST_RUN with XDP_LIVE_FRAMES): every
/// run writes the template headers afresh (a recycled frame holds whatever
/// the receiving side left in it) as a new flow — the next source port,
/// after the last port the next source address (last octet) — and sends
/// it. The UDP checksum is 0 (none), so only the IP checksum follows.
#[xdp]
pub fn bench_pktgen(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + FRAME_MIN > end {
        return XDP_ABORTED;
    }
    let (Some(template), Some(flows)) = (PKTGEN_TEMPLATE.get(0), PKTGEN_FLOWS.get_ptr_mut(0)) else {
        return XDP_ABORTED;
    };
    // SAFETY: this CPU's slot; offsets below FRAME_MIN, bounds checked above.
    unsafe {
        let flow = *flows;
        *flows = flow.wrapping_add(1);
        (data as *mut [u8; FRAME_MIN]).write_unaligned(*template);
        let port = 1024 + (flow % PORTS) as u16;
        ((data + UDP_SPORT) as *mut u16).write_unaligned(port.to_be());
        let old = template[IP_SRC_LAST];
        let new = (1 + (old as u32 + flow / PORTS) % 250) as u8;
        *((data + IP_SRC_LAST) as *mut u8) = new;
        // The low byte of the address's second 16-bit word changed.
        let csum = (data + IP_CSUM) as *mut u16;
        let mut sum = (!u16::from_be(csum.read_unaligned())) as u32 + (!(old as u16)) as u32 + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        csum.write_unaligned((!(sum as u16)).to_be());
    }
    XDP_TX
}

/// The ceiling: every frame straight to one device with the configured
/// MACs, no lookup and no NAT.
#[xdp]
pub fn bench_redirect(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 12 > end {
        return XDP_ABORTED;
    }
    let Some(macs) = REDIRECT_MACS.get(0) else {
        return XDP_ABORTED;
    };
    // SAFETY: 12 bytes, bounds checked above.
    unsafe { (data as *mut [u8; 12]).write_unaligned(*macs) };
    REDIRECT_TO.redirect(0, 0).unwrap_or(XDP_ABORTED)
}

/// Where the measured frames end: IPv4 counted and dropped (the same cheap
/// end for every datapath; its XDP program also lets a veth take XDP
/// frames). ARP passes, so the node still resolves the pod.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + 14 > ctx.data_end() {
        return XDP_PASS;
    }
    // SAFETY: bounds checked above.
    let ethertype = unsafe { ((data + 12) as *const u16).read_unaligned() };
    if ethertype != 0x0800u16.to_be() {
        return XDP_PASS;
    }
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *c += 1 };
    }
    XDP_DROP
}

/// Ethernet + IPv4 without options: where the SCTP header starts.
const SCTP_AT: usize = 34;
/// Largest SCTP packet `bench_sctp_crc_recompute` walks.
const SCTP_MAX: usize = 2048;
/// CRC32c's byte table (reflected polynomial 0x82F63B78).
static CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = (c >> 1) ^ (0x82F6_3B78 & (c & 1).wrapping_neg());
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// The alternative to the datapath's incremental CRC32c update: the whole
/// SCTP packet (IPv4 without options) checksummed again, a table lookup
/// per byte, and stored. XDP_PASS when done, XDP_ABORTED when the frame is
/// not such a packet.
#[xdp]
pub fn bench_sctp_crc_recompute(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + SCTP_AT + 12 > end {
        return XDP_ABORTED;
    }
    // SAFETY: bounds checked above (IPv4 total length at 16, CRC at 42).
    let len = unsafe { u16::from_be(((data + 16) as *const u16).read_unaligned()) } as usize;
    let len = len.saturating_sub(SCTP_AT - 14);
    let field = (data + SCTP_AT + 8) as *mut u32;
    // SAFETY: as above.
    unsafe { field.write_unaligned(0) };
    let mut crc = !0u32;
    for i in 0..SCTP_MAX {
        if i >= len {
            break;
        }
        let at = data + SCTP_AT + i;
        if at + 1 > end {
            return XDP_ABORTED;
        }
        // SAFETY: bounds checked just above.
        let byte = unsafe { *(at as *const u8) };
        crc = CRC32C_TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    // SAFETY: as above; the field is stored little-endian.
    unsafe { field.write_unaligned((!crc).to_le()) };
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
