//! The agent's control plane without the kernel: API objects become
//! validated specs (`model`), specs become service ports with kube-proxy's
//! semantics (`model`, incrementally in `incremental`), and service ports
//! become map writes (`sync`) through the `DatapathMaps` trait — real BPF
//! maps in lb-agent, `fake::FakeMaps` here. Everything in this crate is
//! pure logic: its tests need no root, no LLVM and no nightly.
pub mod fake;
pub mod maglev;
pub mod model;
pub mod sync;
pub mod tracker;
