//! Host-side stub: the programs live in `main.rs` and are built for
//! `bpfel-unknown-none` by `lb-agent/build.rs`; this library only lets the
//! agent name the crate as a build dependency.
#![no_std]
