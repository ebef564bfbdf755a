//! eBPF programs of the load balancer. Entry points only dispatch; each
//! concern has its module (parse, conntrack, select, nat, maps, stats).
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod ingress;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod snat;
mod stats;

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
