//! Host-network clients: processes in the node's own namespace (hostNetwork
//! pods, kubelet probes) reach frontends through cgroup socket hooks that
//! translate at connect()/sendmsg() time — their packets then go straight
//! to the backend — and show the frontend again in getpeername()/recvmsg().
//! The hooks run for sockets of every namespace in the cgroup; they act only
//! on the node's (netns cookie from CONFIG).

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Backend, BackendId, RawAddr, ServiceValue,
    addr::{from_v4_word, v4_word},
    proto,
    sock::{NodeConfig, SockNatKey, SockRevNat, sock_nat_kind},
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

/// ECONNREFUSED, as kube-proxy's REJECT gives a host client.
const ECONNREFUSED: i32 = 111;

/// Refuses the connect()/sendmsg() with ECONNREFUSED (the hook's DENY
/// alone would be EPERM).
#[inline(always)]
fn refused() -> i32 {
    // SAFETY: plain helper call; connect and sendmsg hooks may set their
    // return value (kernel ≥ 5.18).
    let _ = unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
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
            refused()
        } else {
            ALLOW
        };
    };
    if svc.flags & svc_flags::ADDRESS_ONLY != 0 {
        return refused();
    }
    // The node's own traffic is in-cluster traffic: an externalTrafficPolicy
    // Local frontend sends it to every endpoint (kube-proxy's short-circuit
    // of LOCAL sources).
    let svc = if svc.flags & svc_flags::IN_CLUSTER_USES_INTERNAL != 0 {
        select::internal_entry(frontend, port, protocol).unwrap_or(svc)
    } else {
        svc
    };
    // loadBalancerSourceRanges: the agent lists the load-balancer IPs
    // themselves when a range holds the node (kube-proxy's allow-from-node),
    // so the frontend address stands for the node's source here.
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !select::source_allowed(svc.service_id, &frontend) {
        return DENY;
    }
    if svc.backend_count == 0 {
        // No endpoint anywhere: REJECT. No local one (a Local policy): DROP,
        // which a socket can only see as EPERM.
        return if svc.flags & svc_flags::DROP_IF_EMPTY != 0 {
            DENY
        } else {
            refused()
        };
    }
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let Some((backend_id, backend)) = backend_for_socket(cookie, &svc, frontend, port, protocol) else {
        return DENY;
    };
    if !set_user_addr(sa, v6, &backend.addr) {
        return DENY;
    }
    sa.user_port = (backend.port.to_be()) as u32;
    remember(cookie, &frontend, port, protocol, backend_id, &backend);
    stats::count_balanced(svc.service_id, backend_id, 0);
    ALLOW
}

#[inline(always)]
fn nat_key(cookie: u64, addr: &RawAddr, port: u16, protocol: u8, kind: u8) -> SockNatKey {
    SockNatKey {
        cookie,
        addr: *addr,
        port,
        proto: protocol,
        kind,
        _pad: 0,
    }
}

/// The backend this socket already uses for this frontend, while it is
/// still in the service at the same address (all datagrams of an
/// unconnected UDP socket to one service reach one backend); else a new pick.
#[inline(always)]
fn backend_for_socket(
    cookie: u64,
    svc: &ServiceValue,
    frontend: RawAddr,
    port: u16,
    protocol: u8,
) -> Option<(BackendId, Backend)> {
    let key = nat_key(cookie, &frontend, port, protocol, sock_nat_kind::FORWARD);
    // SAFETY: copied out at once.
    if let Some(chosen) = unsafe { SOCK_REVNAT.get(&key).copied() }
        && let Some(b) = select::live_backend(chosen.backend_id, svc.service_id)
        && b.addr == chosen.addr
        && b.port == chosen.port
    {
        return Some((chosen.backend_id, b));
    }
    let now = conntrack::now_secs();
    // Host clients share one source (the node): one affinity entry.
    // Host sockets have no source port yet: hash the socket cookie instead.
    let hash = select::hash_words(
        cookie as u32,
        select::fold(&frontend),
        (cookie >> 32) as u16,
        port,
        protocol,
    );
    select::pick_backend_for(svc, [0; 16], now, hash).ok()
}

/// Records the socket's choice (forward) and how to show the backend as
/// the frontend again (reverse). A failed update costs only stickiness or
/// the translation of that reply's address.
#[inline(always)]
fn remember(cookie: u64, frontend: &RawAddr, port: u16, protocol: u8, backend_id: BackendId, backend: &Backend) {
    let forward = SockRevNat {
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
        backend_id,
    };
    let _ = SOCK_REVNAT.insert(
        &nat_key(cookie, frontend, port, protocol, sock_nat_kind::FORWARD),
        &forward,
        0,
    );
    let reverse = SockRevNat {
        addr: *frontend,
        port,
        _pad: 0,
        backend_id: 0,
    };
    let _ = SOCK_REVNAT.insert(
        &nat_key(cookie, &backend.addr, backend.port, protocol, sock_nat_kind::REVERSE),
        &reverse,
        0,
    );
}

/// recvmsg / getpeername (IPv4 or IPv6): a backend as peer shows as the
/// frontend the socket sent to.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !in_node_netns(ctx) {
        return ALLOW;
    }
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = nat_key(
        cookie,
        &user_addr(sa, v6),
        u16::from_be(sa.user_port as u16),
        sa.protocol as u8,
        sock_nat_kind::REVERSE,
    );
    // SAFETY: copied out at once.
    let Some(r) = (unsafe { SOCK_REVNAT.get(&key).copied() }) else {
        return ALLOW;
    };
    if set_user_addr(sa, v6, &r.addr) {
        sa.user_port = (r.port.to_be()) as u32;
    }
    ALLOW
}
