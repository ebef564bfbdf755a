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

/// connect4 / sendmsg4: a frontend as destination becomes a backend.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext) -> i32 {
    if !in_node_netns(ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let protocol = sa.protocol as u8;
    if protocol != proto::TCP && protocol != proto::UDP {
        return ALLOW;
    }
    let frontend = from_v4_word(sa.user_ip4);
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
    let hash = select::hash_words(cookie as u32, sa.user_ip4, (cookie >> 32) as u16, port, protocol);
    let Ok((backend_id, backend)) = select::pick_backend_for(&svc, [0; 16], now, hash) else {
        return DENY;
    };
    let Some(backend_v4) = v4_word(&backend.addr) else {
        return DENY;
    };
    sa.user_ip4 = backend_v4;
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

/// recvmsg4 / getpeername4: the backend as peer shows as the frontend.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) -> i32 {
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
    if from_v4_word(sa.user_ip4) == r.backend && u16::from_be(sa.user_port as u16) == r.backend_port {
        if let Some(frontend) = v4_word(&r.frontend) {
            sa.user_ip4 = frontend;
            sa.user_port = (r.frontend_port.to_be()) as u32;
        }
    }
    ALLOW
}
