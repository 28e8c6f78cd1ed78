//! The tasks, each a sequence of commands run from the workspace root; the first failure stops it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Runs `program args...` in `root`, failing unless it exits with status 0.
fn run(root: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    // Name cargo as `cargo`, not by the full path in $CARGO.
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    let line = std::iter::once(name)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let status = Command::new(program)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

fn step(title: &str) {
    eprintln!("==> {title}");
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn setup(root: &Path) -> anyhow::Result<()> {
    step("setup (scripts/setup.sh)");
    run(root, "bash", &["scripts/setup.sh"])
}

/// clippy and test name no package, so they take the workspace's `default-members`: every
/// crate but `egress-ebpf`, which only builds for bpfel-unknown-none (through
/// egress-agent/build.rs). `--workspace` would ignore `default-members` and build the eBPF
/// crate for the host, which fails.
pub fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    let cargo = cargo();
    setup(root)?;
    step("fmt");
    run(root, &cargo, &["fmt", "--all", "--check"])?;
    step("layout (no import cycles, no file over 600 lines)");
    crate::layout::layout(root, false)?;
    step("clippy");
    run(
        root,
        &cargo,
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    step("test");
    let mut args = vec!["test"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    run(root, &cargo, &args)
}

pub fn demo(root: &Path) -> anyhow::Result<()> {
    let cargo = cargo();
    setup(root)?;
    step("build the release agent");
    run(root, &cargo, &["build", "--release", "-p", "egress-agent"])?;
    step("demo (scripts/demo.sh)");
    run(
        root,
        "bash",
        &["scripts/demo.sh", "target/release/egress-agent"],
    )?;
    step("demo, pods in their own network namespace (scripts/demo-pods.sh)");
    run(
        root,
        "bash",
        &["scripts/demo-pods.sh", "target/release/egress-agent"],
    )
}
