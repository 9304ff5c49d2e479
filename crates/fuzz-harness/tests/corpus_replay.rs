//! Replays every stored fuzz input (`fuzz/corpus/<target>/*` and the inputs that
//! once crashed a target, `fuzz/regressions/<target>/*`) through its target's body
//! on the stable toolchain: CI checks the decoders against the corpora without
//! nightly or libFuzzer. The fuzzers themselves: see the README ("Fuzzing and fault
//! tests").

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn every_corpus_and_regression_input_replays_without_a_failure() {
    let root = fuzz_dir();
    let mut failures = Vec::new();
    let mut total = 0;
    for (name, body) in fuzz_harness::TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "target {name} has no corpus in {}",
            root.join("corpus").join(name).display()
        );
        let regressions = inputs(&root.join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read corpus file");
            total += 1;
            if let Err(e) = std::panic::catch_unwind(|| body(&data)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{name}: {}: {msg}", path.display()));
            }
        }
        println!(
            "{name}: {} corpus + {} regression inputs",
            corpus.len(),
            regressions.len()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {total} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{total} inputs replayed");
}

/// Every target has its cargo-fuzz entry point, and every entry point a body.
#[test]
fn every_target_has_a_fuzz_entry_point() {
    let dir = fuzz_dir().join("fuzz_targets");
    for (name, _) in fuzz_harness::TARGETS {
        assert!(
            dir.join(format!("{name}.rs")).is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
    }
    for p in inputs(&dir) {
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        assert!(
            fuzz_harness::target(stem).is_some(),
            "{} has no body in fuzz_harness::TARGETS",
            p.display()
        );
    }
}
