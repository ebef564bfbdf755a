//! The kernel side as the agent sees it: the embedded eBPF object, its maps
//! (pinned under the bpf root) and the TC attachments.
pub mod attach;
pub mod load;
pub mod maps;
pub mod sock;

pub use load::{Datapath, LoadOptions};
pub use maps::BpfMaps;
