//! lb-agent: watches Services/EndpointSlices (here from manifests) and
//! programs the eBPF datapath. See README.md for the architecture.
pub mod cli;
pub mod datapath;
pub mod health;
pub mod inspect;
pub mod kube_proxy;
pub mod kube_proxy_config;
pub mod metrics;
pub mod run;
pub mod source;
pub mod trace;

// The pure control plane lives in lb-control; these keep its modules at
// the paths the agent's code uses.
pub use lb_control::{maglev, model, sync, tracker};
