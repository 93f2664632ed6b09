//! Compile-time tests of `#[channel]` and `#[consumer]`: every case under `ui/fail` must fail
//! to compile with the snapshot next to it, every case under `ui/pass` must compile and run,
//! and every error message in the snapshots must read like rustc's own.
//!
//! Run with `cargo test -p ui-tests`; refresh the snapshots with
//! `TRYBUILD=overwrite cargo test -p ui-tests`, then read the diff.

use std::fs;
use std::path::{Path, PathBuf};

const FAIL_DIR: &str = "tests/ui/fail";

#[test]
fn every_mistake_fails_with_its_snapshot_and_every_pass_case_runs() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/**/*.rs");
    t.pass("tests/ui/pass/*.rs");
}

#[test]
fn every_error_message_in_the_snapshots_starts_lowercase_and_has_no_final_period() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(FAIL_DIR);
    let snapshots = files_with_extension(&root, "stderr");
    assert!(
        snapshots.len() >= 22,
        "expected at least 22 snapshots under {FAIL_DIR}, found {}",
        snapshots.len()
    );
    let mut checked = 0;
    let mut problems = Vec::new();
    for snapshot in &snapshots {
        let text = fs::read_to_string(snapshot).expect("snapshot is readable");
        let mut in_file = 0;
        for line in text.lines().filter(|l| l.starts_with("error")) {
            in_file += 1;
            if let Some(problem) = message_problem(line) {
                problems.push(format!("{}: {problem}: {line}", snapshot.display()));
            }
        }
        assert!(in_file > 0, "{} holds no error", snapshot.display());
        checked += in_file;
    }
    assert!(
        checked >= snapshots.len(),
        "checked only {checked} error lines"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_message_check_rejects_capitals_and_final_periods() {
    assert_eq!(message_problem("error: unknown option `x`"), None);
    assert_eq!(
        message_problem("error[E0277]: `u32` is not a channel message type"),
        None
    );
    assert!(message_problem("error: Unknown option `x`").is_some());
    assert!(message_problem("error: unknown option `x`.").is_some());
    assert!(message_problem("error[E0277]: The trait bound is not satisfied.").is_some());
    assert!(message_problem("error:").is_some());
}

/// What is wrong with the message of an `error: …` or `error[E…]: …` line, if anything.
/// A message starts with a lowercase letter or with code in backticks.
fn message_problem(line: &str) -> Option<&'static str> {
    let Some((_, message)) = line.split_once(": ") else {
        return Some("no message after `error:`");
    };
    let message = message.trim();
    match message.chars().next() {
        None => Some("empty message"),
        Some(c) if !(c.is_lowercase() || c == '`') => Some("message does not start lowercase"),
        Some(_) if message.ends_with('.') => Some("message ends with a period"),
        Some(_) => None,
    }
}

/// Every file under `dir`, recursively, whose name ends in `.ext`, sorted.
fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("directory is readable") {
            let path = entry.expect("entry is readable").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}
