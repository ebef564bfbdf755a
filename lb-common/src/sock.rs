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
    /// `config_flags`.
    pub flags: u32,
    pub _pad: u32,
}
assert_size!(NodeConfig, 32);

/// `NodeConfig::flags`.
pub mod config_flags {
    /// Stack forwarding mode (`--forwarding-mode stack`): translated
    /// packets are handed to the kernel's stack, which routes them through
    /// netfilter FORWARD (iptables-based NetworkPolicy), instead of being
    /// redirected to the next hop; masquerading happens at TC egress.
    pub const STACK_FORWARDING: u32 = 1 << 0;
}

/// SOCK_REVNAT map: socket cookie → the frontend a host socket asked for
/// and the backend it was connected to, to show the frontend again in
/// getpeername() and recvmsg().
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNat {
    pub frontend: RawAddr,
    pub backend: RawAddr,
    /// Host byte order.
    pub frontend_port: u16,
    /// Host byte order.
    pub backend_port: u16,
}
assert_size!(SockRevNat, 36);
