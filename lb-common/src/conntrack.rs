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

/// TCP flags remembered in `CtEntry::tcp_flags_seen`; SCTP's chunk types
/// are mapped onto them (`sctp::ct_flags_of`).
pub mod ct_flags {
    pub const SYN: u8 = 0x02;
    pub const FIN: u8 = 0x01;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Lifetimes (seconds): a flow idle for longer is forgotten and its next
/// packet is balanced afresh. kube-proxy's nf_conntrack settings where it
/// has them (--conntrack-tcp-timeout-established 24h,
/// --conntrack-tcp-timeout-close-wait 1h, --conntrack-udp-timeout 30s,
/// --conntrack-udp-timeout-stream 2m).
pub mod ct_timeouts {
    /// Only the opening SYN seen (nf_conntrack's SYN_SENT: 2 min; we keep 1 min).
    pub const TCP_SYN: u32 = 60;
    pub const TCP_ESTABLISHED: u32 = 86_400;
    /// FIN seen from one side only: the other may keep sending for long
    /// (nf_conntrack's CLOSE_WAIT, which kube-proxy raises to 1 h).
    pub const TCP_CLOSE_WAIT: u32 = 3_600;
    /// FIN seen from both sides, or RST: only stragglers are left.
    pub const TCP_CLOSING: u32 = 10;
    /// A UDP (or other non-TCP) flow that has seen no reply.
    pub const UDP: u32 = 30;
    /// One that has seen a reply (nf_conntrack's ASSURED "stream").
    pub const UDP_STREAM: u32 = 120;
    /// SCTP, as nf_conntrack's defaults (kube-proxy sets none for SCTP):
    /// COOKIE_WAIT / COOKIE_ECHOED, ESTABLISHED (heartbeat interval ×
    /// path retransmissions + RTO max) and CLOSED (also used for the
    /// SHUTDOWN states, whose 3 s it rounds up).
    pub const SCTP_HANDSHAKE: u32 = 3;
    pub const SCTP_ESTABLISHED: u32 = 210;
    pub const SCTP_CLOSING: u32 = 10;
}

/// A flow's state as nf_conntrack names it, from the TCP flags each
/// direction has sent (`own`, `peer`) and whether the backend has
/// answered; it picks the flow's lifetime (`ct_timeouts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// TCP, only the opening SYN so far.
    TcpSyn,
    TcpEstablished,
    /// TCP, FIN from one side only: the other side may still send for long.
    TcpCloseWait,
    /// TCP, FIN from both sides or a RST: only stragglers are left.
    TcpClosing,
    /// UDP (or other non-TCP), no reply yet.
    Unreplied,
    /// UDP (or other non-TCP) that has seen a reply (nf_conntrack's ASSURED).
    Stream,
    /// SCTP, by the chunks seen (`sctp::ct_flags_of`: INIT/COOKIE as SYN,
    /// data as ACK, ABORT/SHUTDOWN as FIN): INIT to COOKIE ECHO.
    SctpHandshake,
    SctpEstablished,
    /// After ABORT or a SHUTDOWN chunk.
    SctpClosing,
}

impl CtState {
    #[inline(always)]
    pub fn of(proto: u8, own: u8, peer: u8, replied: bool) -> Self {
        let both = own | peer;
        if proto == crate::proto::SCTP {
            if both & ct_flags::FIN != 0 {
                CtState::SctpClosing
            } else if both & ct_flags::ACK != 0 {
                CtState::SctpEstablished
            } else {
                CtState::SctpHandshake
            }
        } else if proto != crate::proto::TCP {
            if replied { CtState::Stream } else { CtState::Unreplied }
        } else if both & ct_flags::RST != 0 || own & peer & ct_flags::FIN != 0 {
            CtState::TcpClosing
        } else if both & ct_flags::FIN != 0 {
            CtState::TcpCloseWait
        } else if both & ct_flags::ACK != 0 {
            CtState::TcpEstablished
        } else {
            CtState::TcpSyn
        }
    }

    /// The state of a flow whose entry (either direction) is `e`.
    #[inline(always)]
    pub fn of_entry(proto: u8, e: &CtEntry) -> Self {
        Self::of(
            proto,
            e.tcp_flags_seen,
            e.peer_tcp_flags,
            e.flags & entry_flags::REPLIED != 0,
        )
    }

    pub const fn name(self) -> &'static str {
        match self {
            CtState::TcpSyn => "SYN_SENT",
            CtState::TcpEstablished => "ESTABLISHED",
            CtState::TcpCloseWait => "CLOSE_WAIT",
            CtState::TcpClosing => "CLOSING",
            CtState::Unreplied => "UNREPLIED",
            CtState::Stream => "ASSURED",
            CtState::SctpHandshake => "SCTP_HANDSHAKE",
            CtState::SctpEstablished => "SCTP_ESTABLISHED",
            CtState::SctpClosing => "SCTP_CLOSING",
        }
    }
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
    /// TCP flags the other direction's entry has seen (copied when it is
    /// refreshed): with `tcp_flags_seen`, the whole flow's state.
    pub peer_tcp_flags: u8,
    pub _pad: u8,
}
assert_size!(CtEntry, 52);

/// Layout version of CONNTRACK's `CtKey`/`CtEntry`: bumped on any change of
/// their fields' meaning or placement. An agent migrates the entries of the
/// previous version into its own (a conversion kept for one version, in
/// the agent's `datapath::migrate`); older layouts start afresh.
pub const CT_LAYOUT_VERSION: u32 = 1;

/// `CtEntry::flags`.
pub mod entry_flags {
    /// The flow is masqueraded (KUBE-POSTROUTING MASQUERADE).
    pub const SNAT: u8 = 1 << 0;
    /// The backend has answered (a packet hit the reply entry); the
    /// forward entry learns it too. A UDP flow then lives `UDP_STREAM`.
    pub const REPLIED: u8 = 1 << 1;
    /// Copied by the agent from the table of the previous agent, which
    /// may have changed the flow since: while that table is shared (see
    /// lb-ebpf's CONNTRACK_PREV), the datapath takes its entry instead,
    /// then clears this.
    pub const MIGRATED: u8 = 1 << 2;
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
