//! The README's performance table, written by `cargo xtask bench --full` from the run's own
//! verdicts, never typed by hand: the lines between [`BEGIN`] and [`END`] in README.md are
//! replaced by the run's date, duration and load, and its verdict table.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use anyhow::Context as _;

use crate::bench_report::Report;

pub const BEGIN: &str = "<!-- bench:begin (written by `cargo xtask bench --full`; do not edit) -->";
pub const END: &str = "<!-- bench:end -->";

/// The generated block (markers included).
pub fn section(r: &Report, when: &str, secs: f64) -> String {
    let loads: Vec<f64> = r
        .tables
        .iter()
        .flat_map(|t| &t.rows)
        .flat_map(|row| &row.samples)
        .map(|s| s.load)
        .filter(|l| l.is_finite() && *l > 0.0)
        .collect();
    let lo = loads.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = loads.iter().copied().fold(0.0, f64::max);
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(
        s,
        "The last `cargo xtask bench --full` run ({when}, {secs:.0} s; 1-minute load {lo:.1}-{hi:.1} \
         during its samples). Each figure is the median of interleaved samples; every sample, \
         table and method is in [docs/benchmarks.md](docs/benchmarks.md), which the same run \
         wrote. *busy*: a figure measured while the machine was busy (see there).\n"
    );
    let _ = writeln!(s, "| Result | Target | Measured |\n|---|---|---|");
    for v in &r.verdicts {
        let tag = match v.pass {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        };
        let cell = |t: &str| t.replace('|', "\\|");
        let _ = writeln!(s, "| {tag} | {} | {} |", cell(&v.target), cell(&v.measured));
    }
    let _ = write!(s, "{END}");
    s
}

/// Replaces the generated block of `readme` with `block`; an error when the markers are
/// missing or out of order.
pub fn splice(readme: &str, block: &str) -> anyhow::Result<String> {
    let a = readme
        .find(BEGIN)
        .context("README.md has no bench:begin marker")?;
    let b = readme[a..]
        .find(END)
        .map(|i| a + i + END.len())
        .context("README.md has no bench:end marker after bench:begin")?;
    Ok(format!("{}{block}{}", &readme[..a], &readme[b..]))
}

/// Writes the run's block into README.md.
pub fn write(root: &Path, r: &Report, secs: f64) -> anyhow::Result<()> {
    let when = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let path = root.join("README.md");
    let text = fs::read_to_string(&path).context("read README.md")?;
    fs::write(&path, splice(&text, &section(r, &when, secs))?).context("write README.md")?;
    eprintln!("wrote the performance table in README.md");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_report::Verdict;

    #[test]
    fn the_block_replaces_only_what_lies_between_the_markers() {
        let r = Report {
            mode: "full",
            machine: Vec::new(),
            tables: Vec::new(),
            verdicts: vec![Verdict {
                target: "a | b".into(),
                measured: "1.0x".into(),
                pass: Some(false),
            }],
            notes: Vec::new(),
        };
        let block = section(&r, "today", 12.0);
        assert!(
            block.contains("| **not met** | a \\| b | 1.0x |"),
            "{block}"
        );
        let readme = format!("head\n{BEGIN}\nold\n{END}\ntail\n");
        let out = splice(&readme, &block).unwrap();
        assert!(
            out.starts_with("head\n") && out.ends_with("\ntail\n"),
            "{out}"
        );
        assert!(!out.contains("old"));
        assert_eq!(splice(&out, &block).unwrap(), out);
        assert!(splice("no markers", &block).is_err());
    }
}
