//! What the shared steps (parse, conntrack, select, routing) need from a
//! program's context, for TC (`__sk_buff`) and XDP (`xdp_md`) alike.

use aya_ebpf::programs::{TcContext, XdpContext};
use core::ffi::c_void;

pub trait PacketCtx {
    /// Start and end of the directly readable packet data.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whole packet length (for an skb, also the non-linear part).
    fn len(&self) -> u32;
    /// The raw context, for helpers that take either (`bpf_fib_lookup`).
    fn raw(&self) -> *mut c_void;
    /// The interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Makes the first `len` bytes directly readable, where that is needed
    /// (the headers of a GSO/non-linear skb); XDP data is always linear.
    fn make_readable(&self, _len: u32) {}
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.skb.skb as *mut c_void
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // At TC ingress, skb->ifindex is the receiving device.
        // SAFETY: reading the context's own field.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn make_readable(&self, len: u32) {
        let linear = (TcContext::data_end(self) - TcContext::data(self)) as u32;
        if linear < len {
            // Failure just leaves the packet as it is; parsing then sees it short.
            let _ = self.pull_data(len);
        }
    }
}

impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.ctx as *mut c_void
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }
}
