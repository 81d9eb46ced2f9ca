//! Saves the printed figures (paired ratios, memory) for `.ci/bench-table`.
//!
//! Criterion saves only what it times itself, so the figures a bench
//! computes are written beside criterion's results, one small JSON object
//! per figure: `target/paired/<baseline>/<id>.json`, where `<baseline>` is
//! `new` (the last run, as criterion's own `new`) and, with
//! `--save-baseline NAME`, also `NAME`. Nothing is saved in `--test` mode.

use std::fs;
use std::path::PathBuf;

use super::paired::test_mode;

/// The baselines a figure is saved under: `new`, and the name given to
/// `--save-baseline`, if any.
fn baselines() -> Vec<String> {
    let mut names = vec!["new".to_string()];
    let mut args = std::env::args();
    while let Some(arg) = args.next() {
        if arg == "--save-baseline" {
            names.extend(args.next());
        } else if let Some(name) = arg.strip_prefix("--save-baseline=") {
            names.push(name.to_string());
        }
    }
    names
}

/// Saves the figure `id` (for example `scrambled/run/100000`) with its
/// named values.
///
/// # Panics
///
/// If the file cannot be written: a figure that is printed but not saved
/// would make `.ci/bench-table` show an older run's value.
pub fn record(id: &str, values: &[(&str, f64)]) {
    if test_mode() {
        return;
    }
    let fields: Vec<String> = values
        .iter()
        .map(|(name, value)| {
            let value = if value.is_finite() {
                value.to_string()
            } else {
                "null".to_string()
            };
            format!("\"{name}\": {value}")
        })
        .collect();
    let json = format!("{{{}}}\n", fields.join(", "));
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    for baseline in baselines() {
        let path = target
            .join("paired")
            .join(baseline)
            .join(format!("{id}.json"));
        let dir = path.parent().expect("a file path has a parent");
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        fs::write(&path, &json).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
