//! A Kubernetes node made of network namespaces, for end-to-end tests and
//! the demo: one node namespace running `lb-agent`, pod namespaces with tiny
//! HTTP/UDP servers answering with their pod name, and client namespaces.
//!
//! Network rule: only namespaces created here, only 198.18.0.0/15
//! addresses (198.19.x for service VIPs), and no route leaves them. Every
//! namespace, pin and agent is removed by guards, on panic too, and on
//! Ctrl-C through `cleanup::on_interrupt`.

pub mod agent;
pub mod cleanup;
pub mod client;
pub mod cluster;
pub mod fake_apiserver;
pub mod image;
pub mod manifests;
pub mod netns;
pub mod podspec;
pub mod promtool;
pub mod sandbox;
pub mod sctp;
pub mod servers;

pub use agent::Agent;
pub use sandbox::{Pod, Sandbox};
