//! CONNTRACK map (LRU): one forward entry (client → VIP) and one reply entry
//! (backend → client) per balanced flow. Replaces nf_conntrack for our NAT.

use crate::{RawAddr, assert_size};

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtKind {
    /// Key is the packet as the client sent it (dst = VIP).
    Forward = 0,
    /// Key is the backend's reply (src = backend, dst = client).
    Reply = 1,
    /// Stack forwarding mode, masqueraded flows: key is the client's packet
    /// after DNAT (src = client, dst = backend), as it leaves the node; the
    /// entry's SNAT address and port become its source at TC egress.
    Snat = 2,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: RawAddr,
    pub dst_addr: RawAddr,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub proto: u8,
    /// `CtKind` discriminant.
    pub kind: u8,
    pub _pad: [u8; 2],
}
assert_size!(CtKey, 40);

/// TCP flags remembered in `CtEntry::tcp_flags_seen`.
pub mod ct_flags {
    pub const SYN: u8 = 0x02;
    pub const FIN: u8 = 0x01;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Lifetimes (seconds) like Cilium's defaults: a flow idle for longer is
/// forgotten and its next packet is balanced afresh.
pub mod ct_timeouts {
    pub const TCP_SYN: u32 = 60;
    pub const TCP_ESTABLISHED: u32 = 21_600;
    pub const TCP_CLOSING: u32 = 10;
    pub const NON_TCP: u32 = 60;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Forward: the backend address DNAT writes; reply: the frontend (VIP,
    /// node or external address) the reply's source is restored to.
    pub nat_addr: RawAddr,
    /// Port matching `nat_addr`, host byte order.
    pub nat_port: u16,
    /// TCP flags seen on this flow so far (`ct_flags`).
    pub tcp_flags_seen: u8,
    /// `entry_flags`.
    pub flags: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// Monotonic clock seconds (bpf_ktime_get_ns / 1e9) after which the entry is stale.
    pub expires_at: u32,
    /// With `entry_flags::SNAT` — forward: the node address and port the
    /// source is masqueraded to; reply: the client's address and port the
    /// destination is restored to.
    pub snat_addr: RawAddr,
    pub snat_port: u16,
    pub _pad: [u8; 2],
}
assert_size!(CtEntry, 52);

/// `CtEntry::flags`.
pub mod entry_flags {
    /// The flow is masqueraded (KUBE-POSTROUTING MASQUERADE).
    pub const SNAT: u8 = 1 << 0;
}

/// Source ports for masquerading: 1024–29999 and 61000–65535, all but
/// the NodePort range (30000–32767) and Linux's default ephemeral range
/// (32768–60999), so a masqueraded flow never shares a tuple with the
/// node's own connections. ~33,500 ports per backend address and port.
pub mod snat_ports {
    pub const LOW_FIRST: u16 = 1_024;
    pub const LOW_COUNT: u32 = 28_976;
    pub const HIGH_FIRST: u16 = 61_000;
    pub const HIGH_COUNT: u32 = 4_536;
    pub const COUNT: u32 = LOW_COUNT + HIGH_COUNT;
    /// Random tries before a new flow is dropped as `SnatPortsExhausted`.
    pub const TRIES: u32 = 8;

    /// The `n`-th port of the range (`n < COUNT`).
    #[inline(always)]
    pub const fn nth(n: u32) -> u16 {
        if n < LOW_COUNT {
            LOW_FIRST + n as u16
        } else {
            HIGH_FIRST + (n - LOW_COUNT) as u16
        }
    }

    pub const fn contains(port: u16) -> bool {
        (port >= LOW_FIRST && port < LOW_FIRST + LOW_COUNT as u16) || port >= HIGH_FIRST
    }
}
