//! Builds the eBPF object (`egress-ebpf`, bin `egress`) for bpfel-unknown-none and leaves it in
//! OUT_DIR, where `bpf.rs` embeds it. Needs `bpf-linker` and `rust-src` (scripts/setup.sh).
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    // The eBPF toolchain: stable by default, with RUSTC_BOOTSTRAP=1 set only for this nested
    // build (it needs -Z build-std=core). EGRESS_EBPF_TOOLCHAIN=nightly also works.
    println!("cargo:rerun-if-env-changed=EGRESS_EBPF_TOOLCHAIN");
    let toolchain = env::var("EGRESS_EBPF_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    if toolchain != "nightly" {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../egress-ebpf").canonicalize()?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "egress-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
