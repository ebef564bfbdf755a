//! Socket-level translation for host-network clients (cgroup connect4 /
//! sendmsg4 / recvmsg4 / getpeername4 hooks).

use crate::{RawAddr, assert_size};

/// CONFIG map (array of one): node-wide settings of the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Cookie of the node's network namespace. The socket hooks sit in a
    /// cgroup that sockets of every namespace share; they only act on this one's.
    pub netns_cookie: u64,
    /// Conntrack lifetimes in seconds (0: the `ct_timeouts` default).
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    pub tcp_close_wait_timeout: u32,
    pub udp_stream_timeout: u32,
    /// `config_flags`.
    pub flags: u32,
    pub _pad: u32,
}
assert_size!(NodeConfig, 40);

/// `NodeConfig::flags`.
pub mod config_flags {
    /// Stack forwarding mode (`--forwarding-mode stack`): translated
    /// packets are handed to the kernel's stack, which routes them through
    /// netfilter FORWARD (iptables-based NetworkPolicy), instead of being
    /// redirected to the next hop; masquerading happens at TC egress.
    pub const STACK_FORWARDING: u32 = 1 << 0;
}

/// `SockNatKey::kind`.
pub mod sock_nat_kind {
    /// Key: the frontend the socket addressed; value: the backend chosen
    /// for it, so every datagram of an unconnected socket to one service
    /// goes to the same backend.
    pub const FORWARD: u8 = 0;
    /// Key: a backend the socket was sent to; value: the frontend shown
    /// again in getpeername() and recvmsg().
    pub const REVERSE: u8 = 1;
}

/// SOCK_REVNAT key: one translation of one host socket — per (socket,
/// frontend) forward, per (socket, backend) reverse, so a socket talking
/// to several services, or to one backend after another, gets every
/// reply translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockNatKey {
    pub cookie: u64,
    pub addr: RawAddr,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    /// `sock_nat_kind`.
    pub kind: u8,
    pub _pad: u32,
}
assert_size!(SockNatKey, 32);

/// SOCK_REVNAT value: the other side of the translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNat {
    pub addr: RawAddr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    /// Forward: the backend's id (the choice stands while the backend is
    /// still in the service at this address); reverse: 0.
    pub backend_id: u32,
}
assert_size!(SockRevNat, 24);

/// Layout version of SOCK_REVNAT's `SockNatKey`/`SockRevNat` (see
/// `conntrack::CT_LAYOUT_VERSION`).
pub const SOCK_REVNAT_LAYOUT_VERSION: u32 = 1;
