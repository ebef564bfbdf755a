//! The kernel side as the agent sees it: the embedded eBPF object, its maps
//! (pinned under the bpf root), the TC attachments and the XDP fast path.
pub mod attach;
pub mod load;
pub mod maps;
pub mod migrate;
pub mod pins;
pub mod sock;
pub mod xdp;

pub use load::{Datapath, LoadOptions};
pub use maps::{BpfMaps, ConntrackTimeouts};
