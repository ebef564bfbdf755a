//! Where objects come from. Every source produces a `model::Snapshot`.
pub mod manifests;
