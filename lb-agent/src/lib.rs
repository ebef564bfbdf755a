//! lb-agent: watches Services/EndpointSlices (here from manifests) and
//! programs the eBPF datapath. See README.md for the architecture.
pub mod cli;
pub mod datapath;
pub mod health;
pub mod inspect;
pub mod kube_proxy;
pub mod kube_proxy_config;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod run;
pub mod source;
pub mod sync;
pub mod trace;
pub mod tracker;
