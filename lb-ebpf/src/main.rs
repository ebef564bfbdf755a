//! eBPF programs of the load balancer. Entry points only dispatch; each
//! concern has its module (parse, conntrack, select, nat, maps, stats).
#![no_std]
#![no_main]

mod conntrack;
mod ctx;
mod egress;
mod forward;
mod icmp;
mod ingress;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod snat;
mod sock;
mod stats;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action::XDP_DROP},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// TC ingress on every node interface: balances traffic to service VIPs and
/// reverse-translates backend replies (KUBE-SERVICES/KUBE-SVC/KUBE-SEP).
#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    match ingress::try_ingress(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

/// TC egress on the same interfaces: replies of host-network endpoints get
/// their frontend back; in stack forwarding mode also masquerading and the
/// reverse NAT of forwarded replies (see egress.rs).
#[classifier]
pub fn lb_egress(ctx: TcContext) -> i32 {
    match egress::try_egress(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

/// XDP on the node's external interfaces: the NodePort/LoadBalancer fast
/// path; what it cannot finish passes to `lb_ingress`.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match xdp::try_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count_drop(reason);
            XDP_DROP
        }
    }
}

/// connect() of host-network sockets: frontend → backend.
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, false)
}

/// sendmsg() of unconnected host-network UDP sockets: frontend → backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, false)
}

/// recvmsg() of host-network UDP sockets: backend shown as the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx, false)
}

/// getpeername() of host-network sockets: backend shown as the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx, false)
}

/// The same four for IPv6 sockets (also IPv4-mapped addresses on them).
#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx, true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
