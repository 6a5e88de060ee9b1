//! `cargo xtask fuzz`: runs the `cargo fuzz` targets of `fuzz/` (libFuzzer,
//! nightly) for a while each and sums up what they did.
//!
//! Every target starts from its committed seeds (`fuzz/corpus/<target>/`) and
//! the inputs earlier runs kept (`fuzz/corpus-work/<target>/`, not committed;
//! new inputs go there), with the dictionary `fuzz/dicts/<target>.dict` when
//! there is one. An input that makes a target fail is copied from
//! libFuzzer's `fuzz/artifacts/<target>/` to
//! `proxy-userspace/tests/fuzz_regressions/<target>/`, where the
//! `fuzz_regressions` test of proxy-userspace replays it in every `cargo test`
//! (it fails until the bug is fixed).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    prereq::{self, Needs},
    proc::{cargo, run_checked, stdout_of, succeeds},
    workspace_root,
};

/// Arguments of `cargo xtask fuzz`.
#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long to run each target, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    secs: u64,
    /// Run only this target (repeatable); every target when omitted.
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// Extra libFuzzer options, after `--` (e.g. `-- -max_len=512`).
    #[arg(last = true)]
    libfuzzer_args: Vec<OsString>,
}

/// The cargo-fuzz release installed when `cargo fuzz` is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Longest a single input may run before libFuzzer calls it a hang (seconds).
const INPUT_TIMEOUT_SECS: u32 = 10;

/// What one target's run did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    /// Inputs executed.
    runs: Option<u64>,
    /// Seconds libFuzzer ran (its `Done N runs in S second(s)`).
    seconds: Option<u64>,
    /// Average executions per second.
    execs_per_sec: Option<u64>,
    /// Coverage counters hit (libFuzzer's `cov:`).
    cov: Option<u64>,
    /// Features (libFuzzer's `ft:`).
    features: Option<u64>,
    /// Inputs in the corpus at the end (libFuzzer's `corp:`).
    corpus: Option<u64>,
}

/// One target's outcome.
struct Outcome {
    target: String,
    /// Wall-clock time of `cargo fuzz run`, a build included.
    seconds: f64,
    stats: Stats,
    /// Failing inputs found by this run, as copied into the regression directory.
    failures: Vec<PathBuf>,
    /// Other artifacts (timeouts, out-of-memory, slow units), left where they are.
    other_artifacts: Vec<PathBuf>,
    /// libFuzzer ended with an error that left no artifact.
    error: Option<String>,
    log: PathBuf,
}

/// `cargo xtask fuzz`.
pub fn run(args: FuzzArgs) -> Result<()> {
    prereq::ensure(Needs::BUILD)?;
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");

    let all = stdout_of(cargo().args(["+nightly", "fuzz", "list"]))?;
    let all: Vec<String> = all.lines().map(|line| line.trim().to_owned()).collect();
    let targets = if args.targets.is_empty() {
        all.clone()
    } else {
        for target in &args.targets {
            ensure!(
                all.contains(target),
                "no fuzz target {target:?}; the targets are: {}",
                all.join(", ")
            );
        }
        args.targets.clone()
    };
    ensure!(!targets.is_empty(), "fuzz/ has no targets");

    eprintln!("\n==> xtask: cargo +nightly fuzz build (every target)");
    run_checked(cargo().args(["+nightly", "fuzz", "build"]))?;

    let logs = fuzz_dir.join("target").join("xtask-logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(run_target(
            root,
            target,
            args.secs,
            &args.libfuzzer_args,
            &logs,
        )?);
    }

    print_summary(&outcomes);
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|outcome| !outcome.failures.is_empty() || outcome.error.is_some())
        .collect();
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|o| o.target.as_str()).collect();
        bail!(
            "fuzzing found failures in {}; the failing inputs are in \
             proxy-userspace/tests/fuzz_regressions/ and \
             `cargo test -p proxy-userspace --test fuzz_regressions` replays them",
            names.join(", ")
        );
    }
    Ok(())
}

/// Installs cargo-fuzz unless `cargo fuzz` already works.
fn ensure_cargo_fuzz() -> Result<()> {
    if succeeds(cargo().args(["+nightly", "fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run_checked(cargo().args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// Runs one target for `secs` seconds, its output going to a log file.
fn run_target(
    root: &Path,
    target: &str,
    secs: u64,
    extra: &[OsString],
    logs: &Path,
) -> Result<Outcome> {
    let seeds = root.join("fuzz").join("corpus").join(target);
    let work = root.join("fuzz").join("corpus-work").join(target);
    let artifacts = root.join("fuzz").join("artifacts").join(target);
    let regressions = root
        .join("proxy-userspace")
        .join("tests")
        .join("fuzz_regressions")
        .join(target);
    for dir in [&seeds, &work, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A libFuzzer dictionary (keywords worth splicing into inputs), if any.
    let dict = root
        .join("fuzz")
        .join("dicts")
        .join(format!("{target}.dict"));
    let before = files_in(&artifacts)?;
    let log = logs.join(format!("{target}.log"));
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let log_err = log_file.try_clone().context("duplicating the log file")?;

    eprintln!(
        "\n==> xtask: fuzzing {target} for {secs} s (log: {})",
        log.display()
    );
    let started = Instant::now();
    let status = cargo()
        .args(["+nightly", "fuzz", "run", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .args(dict.is_file().then(|| {
            let mut arg = OsString::from("-dict=");
            arg.push(&dict);
            arg
        }))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .status()
        .context("starting `cargo fuzz run`")?;
    let seconds = started.elapsed().as_secs_f64();
    let output = fs::read_to_string(&log).unwrap_or_default();
    let stats = parse_stats(&output);

    let mut failures = Vec::new();
    let mut other_artifacts = Vec::new();
    for artifact in files_in(&artifacts)?.difference(&before) {
        let name = artifact.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("crash-") {
            fs::create_dir_all(&regressions)
                .with_context(|| format!("creating {}", regressions.display()))?;
            let kept = regressions.join(&*name);
            fs::copy(artifact, &kept)
                .with_context(|| format!("copying {} to {}", artifact.display(), kept.display()))?;
            failures.push(kept);
        } else {
            other_artifacts.push(artifact.clone());
        }
    }
    let error = (!status.success() && failures.is_empty() && other_artifacts.is_empty())
        .then(|| format!("`cargo fuzz run {target}` failed ({status})"));
    if !status.success() {
        eprintln!("{}", failure_excerpt(&output));
    }
    Ok(Outcome {
        target: target.to_owned(),
        seconds,
        stats,
        failures,
        other_artifacts,
        error,
        log,
    })
}

/// The regular files directly in `dir`.
fn files_in(dir: &Path) -> Result<BTreeSet<PathBuf>> {
    let mut files = BTreeSet::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.insert(path);
        }
    }
    Ok(files)
}

/// The numbers of libFuzzer's last status line and final statistics.
fn parse_stats(output: &str) -> Stats {
    let mut stats = Stats::default();
    for line in output.lines() {
        let line = line.trim();
        if line.starts_with('#') && line.contains(" cov: ") {
            let field = |name: &str| {
                line.split_whitespace()
                    .skip_while(|word| *word != name)
                    .nth(1)
                    .and_then(|value| value.split('/').next())
                    .and_then(|value| value.parse().ok())
            };
            stats.cov = field("cov:").or(stats.cov);
            stats.features = field("ft:").or(stats.features);
            stats.corpus = field("corp:").or(stats.corpus);
            stats.runs = line[1..]
                .split_whitespace()
                .next()
                .and_then(|runs| runs.parse().ok())
                .or(stats.runs);
        } else if let Some(value) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.runs = value.trim().parse().ok().or(stats.runs);
        } else if let Some(value) = line.strip_prefix("stat::average_exec_per_sec:") {
            stats.execs_per_sec = value.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("Done ") {
            // `Done 262144 runs in 61 second(s)`
            let words: Vec<&str> = rest.split(' ').collect();
            if let [runs, "runs", "in", seconds, "second(s)"] = words.as_slice() {
                stats.runs = runs.parse().ok().or(stats.runs);
                stats.seconds = seconds.parse().ok();
            }
        }
    }
    stats
}

/// What libFuzzer said about a failure: from the panic or sanitizer report
/// to the end of the output, at most 40 lines.
fn failure_excerpt(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    let start = lines
        .iter()
        .position(|line| {
            line.contains("panicked at")
                || line.contains("==ERROR:")
                || line.contains("ERROR: libFuzzer")
        })
        .unwrap_or(lines.len().saturating_sub(20));
    lines[start..]
        .iter()
        .take(40)
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

fn show(value: Option<u64>) -> String {
    value.map_or_else(|| "?".to_owned(), |value| value.to_string())
}

fn print_summary(outcomes: &[Outcome]) {
    println!("\nfuzzing summary");
    println!(
        "{:<20} {:>7} {:>7} {:>12} {:>9} {:>7} {:>7} {:>7}  failures",
        "target", "fuzzed", "wall", "runs", "exec/s", "cov", "ft", "corpus"
    );
    for outcome in outcomes {
        let failures = match (outcome.failures.len(), &outcome.error) {
            (0, Some(_)) => "error (see the log)".to_owned(),
            (count, _) => count.to_string(),
        };
        println!(
            "{:<20} {:>7} {:>7.0} {:>12} {:>9} {:>7} {:>7} {:>7}  {failures}",
            outcome.target,
            show(outcome.stats.seconds),
            outcome.seconds,
            show(outcome.stats.runs),
            show(outcome.stats.execs_per_sec),
            show(outcome.stats.cov),
            show(outcome.stats.features),
            show(outcome.stats.corpus),
        );
    }
    for outcome in outcomes {
        for failure in &outcome.failures {
            println!(
                "{}: failing input kept as {}",
                outcome.target,
                failure.display()
            );
        }
        for artifact in &outcome.other_artifacts {
            println!(
                "{}: libFuzzer left {} (a hang, memory or slow input; not a regression input)",
                outcome.target,
                artifact.display()
            );
        }
        if let Some(error) = &outcome.error {
            println!(
                "{}: {error}; log: {}",
                outcome.target,
                outcome.log.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_from_a_finished_run() {
        let output = "\
INFO: Seed: 1234
#2\tINITED cov: 386 ft: 522 corp: 7/445b exec/s: 0 rss: 52Mb
#1024\tpulse  cov: 400 ft: 600 corp: 9/1Kb lim: 122 exec/s: 512 rss: 53Mb
#262144\tDONE   cov: 412 ft: 655 corp: 12/2048b lim: 4096 exec/s: 4297 rss: 60Mb
Done 262144 runs in 61 second(s)
stat::number_of_executed_units: 262144
stat::average_exec_per_sec:     4297
stat::new_units_added:          5
";
        assert_eq!(
            parse_stats(output),
            Stats {
                runs: Some(262_144),
                seconds: Some(61),
                execs_per_sec: Some(4297),
                cov: Some(412),
                features: Some(655),
                corpus: Some(12),
            }
        );
    }

    #[test]
    fn stats_from_a_crashed_run() {
        let output = "\
#8\tINITED cov: 100 ft: 120 corp: 7/445b exec/s: 0 rss: 52Mb
#77\tNEW    cov: 105 ft: 130 corp: 8/500b lim: 122 exec/s: 0 rss: 52Mb L: 60/80 MS: 1 ChangeBit-
thread '<unnamed>' panicked at fuzz/src/lib.rs:10:5:
boom
==1234== ERROR: libFuzzer: deadly signal
";
        let stats = parse_stats(output);
        assert_eq!(stats.runs, Some(77));
        assert_eq!(stats.cov, Some(105));
        assert_eq!(stats.execs_per_sec, None);
        assert_eq!(stats.seconds, None);
        assert!(failure_excerpt(output).starts_with("thread '<unnamed>' panicked"));
    }
}
