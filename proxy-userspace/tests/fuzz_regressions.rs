//! Replays inputs through the fuzz targets' code (`fuzz/src/lib.rs`): every
//! input that once made a target fail (`tests/fuzz_regressions/<target>/`,
//! added by `cargo xtask fuzz`) and the seed corpora (`fuzz/corpus/<target>/`).
//! Each must go through without a panic: the parsers' properties (round trips,
//! escaping) hold for them.

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::{
    fs,
    path::{Path, PathBuf},
};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir/<target>/` for every target, sorted; a subdirectory named
/// after no target is an error (a renamed target would otherwise lose its
/// regression inputs silently).
fn inputs(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let entry = entry.expect("reading a directory entry");
        let name = entry.file_name();
        let name = name.to_str().expect("target directory names are UTF-8");
        if !entry.path().is_dir() {
            continue;
        }
        let Some(&(target, _)) = harness::TARGETS.iter().find(|(target, _)| *target == name) else {
            panic!("{}: no fuzz target is named {name:?}", dir.display());
        };
        let mut files: Vec<PathBuf> = fs::read_dir(entry.path())
            .expect("reading a target directory")
            .map(|file| file.expect("reading a directory entry").path())
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        found.extend(files.into_iter().map(|file| (target, file)));
    }
    found.sort();
    found
}

fn replay(inputs: &[(&'static str, PathBuf)]) {
    for (target, file) in inputs {
        let run = harness::TARGETS
            .iter()
            .find(|(name, _)| name == target)
            .map(|&(_, run)| run)
            .expect("a known target");
        let data = fs::read(file).expect("reading an input");
        eprintln!("{target}: {}", file.display());
        run(&data);
    }
}

/// One test for both directories, so that the targets that write files into
/// their fixture directory never run concurrently.
#[test]
fn fuzz_inputs_replay_without_failures() {
    let regressions = inputs(&manifest_dir().join("tests/fuzz_regressions"));
    let seeds = inputs(&manifest_dir().join("../fuzz/corpus"));
    assert!(!seeds.is_empty(), "the seed corpora are missing");
    replay(&regressions);
    replay(&seeds);
    harness::remove_fixtures();
}
