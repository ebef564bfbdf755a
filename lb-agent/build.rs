//! Builds the eBPF object (`lb-ebpf`, nightly + build-std) into OUT_DIR so the
//! agent can embed it. `cargo xtask setup` installs what this needs.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
