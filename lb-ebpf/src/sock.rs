//! Host-network clients: processes in the node's own namespace (hostNetwork
//! pods, kubelet probes) reach frontends through cgroup socket hooks that
//! translate at connect()/sendmsg() time — their packets then go straight
//! to the backend — and show the frontend again in getpeername()/recvmsg().
//! The hooks run for sockets of every namespace in the cgroup; they act only
//! on the node's (netns cookie from CONFIG).

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use lb_common::{
    RawAddr,
    addr::{from_v4_word, v4_word},
    proto,
    sock::{NodeConfig, SockRevNat},
    svc_flags,
};

use crate::{
    conntrack,
    maps::{CONFIG, SOCK_REVNAT},
    select, stats,
};

/// Verdicts of sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else { return false };
    let cfg: &NodeConfig = cfg;
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) };
    cfg.netns_cookie != 0 && cookie == cfg.netns_cookie
}

/// The socket address's IP as a RawAddr (IPv4 mapped; an IPv6 socket's
/// `::ffff:a.b.c.d` is the same key as the IPv4 frontend).
#[inline(always)]
fn user_addr(sa: &aya_ebpf::bindings::bpf_sock_addr, v6: bool) -> RawAddr {
    if !v6 {
        return from_v4_word(sa.user_ip4);
    }
    let mut a = [0u8; 16];
    // One 4-byte load per word, as the verifier wants for user_ip6.
    for (i, w) in sa.user_ip6.iter().enumerate() {
        a[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    a
}

/// Writes `addr` as the socket address's IP. `false`: not representable
/// (an IPv6 backend for an IPv4 socket: never programmed).
#[inline(always)]
fn set_user_addr(sa: &mut aya_ebpf::bindings::bpf_sock_addr, v6: bool, addr: &RawAddr) -> bool {
    if !v6 {
        let Some(word) = v4_word(addr) else { return false };
        sa.user_ip4 = word;
        return true;
    }
    for i in 0..4 {
        sa.user_ip6[i] = u32::from_ne_bytes([addr[i * 4], addr[i * 4 + 1], addr[i * 4 + 2], addr[i * 4 + 3]]);
    }
    true
}

/// connect / sendmsg (IPv4 or IPv6): a frontend as destination becomes a backend.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !in_node_netns(ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let protocol = sa.protocol as u8;
    if protocol != proto::TCP && protocol != proto::UDP {
        return ALLOW;
    }
    let frontend = user_addr(sa, v6);
    let port = u16::from_be(sa.user_port as u16);
    let Some(svc) = select::lookup_frontend(frontend, port, protocol) else {
        // A cluster IP on a port it does not serve: refused.
        return if select::is_service_address(&frontend) {
            DENY
        } else {
            ALLOW
        };
    };
    if svc.flags & svc_flags::ADDRESS_ONLY != 0 || svc.backend_count == 0 {
        return DENY;
    }
    let now = conntrack::now_secs();
    // Host clients share one source (the node): one affinity entry.
    // Host sockets have no source port yet: hash the socket cookie instead.
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let hash = select::hash_words(
        cookie as u32,
        select::fold(&frontend),
        (cookie >> 32) as u16,
        port,
        protocol,
    );
    let Ok((backend_id, backend)) = select::pick_backend_for(&svc, [0; 16], now, hash) else {
        return DENY;
    };
    if !set_user_addr(sa, v6, &backend.addr) {
        return DENY;
    }
    sa.user_port = (backend.port.to_be()) as u32;
    let revnat = SockRevNat {
        frontend,
        backend: backend.addr,
        frontend_port: port,
        backend_port: backend.port,
    };
    let _ = SOCK_REVNAT.insert(&cookie, &revnat, 0);
    stats::count_balanced(svc.service_id, backend_id, 0);
    ALLOW
}

/// recvmsg / getpeername (IPv4 or IPv6): the backend as peer shows as the frontend.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !in_node_netns(ctx) {
        return ALLOW;
    }
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    // SAFETY: copied out at once.
    let Some(r) = (unsafe { SOCK_REVNAT.get(&cookie).copied() }) else {
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if user_addr(sa, v6) == r.backend
        && u16::from_be(sa.user_port as u16) == r.backend_port
        && set_user_addr(sa, v6, &r.frontend)
    {
        sa.user_port = (r.frontend_port.to_be()) as u32;
    }
    ALLOW
}
