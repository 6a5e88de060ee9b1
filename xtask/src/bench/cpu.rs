//! Whole-machine busy time, kernel included, from cpuidle residency.
//!
//! busy = wall × online CPUs − Σ idle residency. The kernel's softirq and
//! worker time (where a sockmap splice does its work) counts as busy, which
//! per-process accounting would miss. /proc/stat is tick-sampled and misses
//! bursty work on these VMs, so it is only the fallback when cpuidle is absent.

use std::{
    collections::{HashMap, HashSet},
    fs,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Where idle time came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// Σ /sys/devices/system/cpu/cpu*/cpuidle/state*/time (µs).
    Cpuidle,
    /// idle + iowait columns of /proc/stat (ticks).
    ProcStat,
}

impl Source {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Cpuidle => "cpuidle residency (/sys/devices/system/cpu/cpu*/cpuidle/state*/time)",
            Self::ProcStat => {
                "/proc/stat idle+iowait (fallback: cpuidle is absent; tick-sampled, \
                 under-counts bursty work)"
            }
        }
    }
}

/// One reading of the machine's idle time.
#[derive(Clone, Copy)]
pub struct Sample {
    at: Instant,
    idle_us: u64,
    pub source: Source,
}

/// Online CPUs.
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// Reads the machine's total idle time now.
pub fn sample() -> Sample {
    let at = Instant::now();
    match cpuidle_us() {
        Some(idle_us) => Sample {
            at,
            idle_us,
            source: Source::Cpuidle,
        },
        None => Sample {
            at,
            idle_us: proc_stat_idle_us(),
            source: Source::ProcStat,
        },
    }
}

impl Sample {
    /// (wall seconds, busy CPU-seconds) from `self` to `later`.
    pub fn busy_until(&self, later: &Sample) -> (f64, f64) {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let idle = later.idle_us.saturating_sub(self.idle_us) as f64 / 1e6;
        (wall, (wall * f64::from(online_cpus()) - idle).max(0.0))
    }
}

fn cpuidle_us() -> Option<u64> {
    let mut total = 0u64;
    let mut found = false;
    for cpu in fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = cpu.file_name();
        let name = name.to_string_lossy();
        if !name
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(states) = fs::read_dir(cpu.path().join("cpuidle")) else {
            continue;
        };
        for state in states.flatten() {
            if let Some(us) = fs::read_to_string(state.path().join("time"))
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
            {
                total += us;
                found = true;
            }
        }
    }
    found.then_some(total)
}

/// USER_HZ.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1)
}

fn proc_stat_idle_us() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let hz = clock_ticks();
    stat.lines()
        .find(|line| line.starts_with("cpu "))
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|field| field.parse().ok())
                .collect();
            // user nice system idle iowait ...
            let ticks = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
            ticks * 1_000_000 / hz
        })
        .unwrap_or(0)
}

/// Measures the CPU time that user processes outside the benchmark's
/// process tree use while it runs (compilers of other engineers on a shared
/// machine), so the benchmark's own share can be told apart. A thread scans
/// /proc ten times a second and adds up each process's run time (utime +
/// stime of all its threads); a process is missed only for its last < 100 ms.
/// Kernel threads are left out: the sockmap plane's work runs in kernel
/// workers and belongs to the benchmark.
pub struct OthersMeter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<f64>>,
}

/// PF_KTHREAD in /proc/PID/stat's flags.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What a scan knows about one process.
struct Seen {
    parent: u32,
    /// Kernel thread: never counted.
    kernel: bool,
    /// Run time at the last scan, in ns.
    ran_ns: u64,
}

impl OthersMeter {
    /// Takes the baseline and starts scanning.
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let me = std::process::id();
            let mut seen: HashMap<u32, Seen> = HashMap::new();
            let mut total_ns = 0u64;
            scan(&mut seen, me, false);
            loop {
                let last = flag.load(Ordering::Relaxed);
                total_ns += scan(&mut seen, me, true);
                if last {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            total_ns as f64 / 1e9
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops (after one last scan) and returns the others' CPU-seconds.
    pub fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for OthersMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// One pass over /proc: updates `seen` and returns the run time (ns) that
/// processes outside `me`'s tree gained since the previous pass (nothing on
/// the baseline pass, when `counting` is false).
fn scan(seen: &mut HashMap<u32, Seen>, me: u32, counting: bool) -> u64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut gained = 0;
    let mut alive = HashSet::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some((parent, kernel, ran_ns)) = stat(pid) else {
            continue;
        };
        alive.insert(pid);
        let new_time = if let Some(known) = seen.get_mut(&pid) {
            let delta = ran_ns.saturating_sub(known.ran_ns);
            known.ran_ns = ran_ns;
            (!known.kernel).then_some(delta)
        } else {
            seen.insert(
                pid,
                Seen {
                    parent,
                    kernel,
                    ran_ns,
                },
            );
            // New since the last pass: all of its run time is new.
            (!kernel).then_some(ran_ns)
        };
        if let Some(ns) = new_time {
            if counting && !in_tree(seen, pid, me) {
                gained += ns;
            }
        }
    }
    seen.retain(|pid, _| alive.contains(pid));
    gained
}

/// Whether `pid` descends from `me`, by the parents recorded in `seen`.
fn in_tree(seen: &HashMap<u32, Seen>, mut pid: u32, me: u32) -> bool {
    for _ in 0..64 {
        if pid == me {
            return true;
        }
        match seen.get(&pid) {
            Some(known) if known.parent != 0 && known.parent != pid => pid = known.parent,
            _ => return false,
        }
    }
    false
}

/// (parent pid, kernel thread, run time in ns) from /proc/PID/stat. The run
/// time is utime + stime, summed over every thread of the process, in clock
/// ticks (the kernel scales them to its precise run time, so deltas are
/// exact to a tick). /proc/PID/schedstat would be finer but covers the main
/// thread only.
fn stat(pid: u32) -> Option<(u32, bool, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state(0) ppid(1) pgrp session tty tpgid flags(6) minflt cminflt majflt
    // cmajflt utime(11) stime(12)
    let parent: u32 = fields.get(1)?.parse().ok()?;
    let flags: u64 = fields.get(6)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let kernel = flags & PF_KTHREAD != 0 || pid == 2 || parent == 2;
    Some((
        parent,
        kernel,
        (utime + stime) * 1_000_000_000 / clock_ticks(),
    ))
}

/// CPU-seconds (user + system) `pid` and every process below it have used so
/// far: a proxy's own cost, helpers (Squid's `basic_ncsa_auth`) included.
/// Loopback makes a sender pay for its segments' receive path, so this is the
/// kernel work a proxy causes as well as its own. `None` once `pid` is gone.
pub fn process_tree_cpu_secs(pid: u32) -> Option<f64> {
    let (_, _, own_ns) = stat(pid)?;
    // One /proc scan (as the others' meter makes) for the parent links.
    let mut seen = HashMap::new();
    scan(&mut seen, pid, false);
    let below: u64 = seen
        .iter()
        .filter(|(&other, _)| other != pid && in_tree(&seen, other, pid))
        .map(|(_, known)| known.ran_ns)
        .sum();
    Some((own_ns + below) as f64 / 1e9)
}

/// CPU-seconds (user + system) of this process alone, every thread of it:
/// the benchmark's own clients and servers (its children are not counted).
pub fn own_cpu_secs() -> Option<f64> {
    stat(std::process::id()).map(|(_, _, ran_ns)| ran_ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "prints what other processes use now"]
    fn others_meter_prints() {
        let meter = OthersMeter::start();
        let before = sample();
        thread::sleep(Duration::from_secs(2));
        let after = sample();
        let others = meter.finish();
        let (wall, busy) = before.busy_until(&after);
        println!("wall {wall:.2} s, busy {busy:.2} CPU-s, others {others:.2} CPU-s");
    }
}
