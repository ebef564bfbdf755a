//! Builds the eBPF object (`lb-ebpf`, nightly + build-std) into OUT_DIR so the
//! agent can embed it. `cargo xtask setup` installs what this needs.
use aya_build::{Package, Toolchain};

/// The pinned nightly the eBPF object is built with (reproducible images;
/// `cargo xtask setup` installs it).
const TOOLCHAIN_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf/nightly-toolchain");

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    println!("cargo:rerun-if-changed={TOOLCHAIN_FILE}");
    let toolchain = std::fs::read_to_string(TOOLCHAIN_FILE)?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(toolchain.trim()),
    )
}
