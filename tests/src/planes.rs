//! Which data plane moved a proxy's tunnels: a test aimed at one plane checks
//! every tunnel ran on it, so a fallback to another plane fails it. From the
//! JSON access log (each record's `dataplane`), or, where a test needs Squid
//! lines or no log, from `/metrics` (`spliced_tunnels_total{dataplane}`,
//! counted as each tunnel's record is written).

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration};

use crate::wait_until;

/// How long a check waits for the tunnels it expects to be logged.
const WAIT: Duration = Duration::from_secs(30);

/// Waits for at least `at_least` tunnel records (status 200, not periodic) in
/// the JSON access log at `log` and fails the test unless each says it ran
/// on `plane`. `context` (the proxy's stderr) goes into the failure.
pub fn assert_records(log: &Path, plane: &str, at_least: usize, context: impl Fn() -> String) {
    let tunnels = || -> Vec<serde_json::Value> {
        crate::complete_lines(log)
            .iter()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|err| {
                    panic!("not a JSON access record (use --log-format json): {line:?}: {err}")
                })
            })
            .filter(|record| record["status"] == 200 && record["end"] != "periodic")
            .collect()
    };
    let mut records = Vec::new();
    let enough = wait_until(WAIT, || {
        records = tunnels();
        records.len() >= at_least
    });
    assert!(
        enough,
        "{} tunnel records, expected at least {at_least}:\n{}",
        records.len(),
        context()
    );
    for record in &records {
        assert_eq!(
            record["dataplane"],
            plane,
            "a tunnel ran on another plane: {record}\n{}",
            context()
        );
    }
}

/// The closed tunnels of the proxy whose admin listener is `admin` (inside
/// the network namespace `netns`, if any), by the data plane that moved them.
pub fn closed_by_plane(admin: SocketAddr, netns: Option<&str>) -> HashMap<String, u64> {
    let text = match netns {
        Some(name) => {
            crate::netns::enter_named(name, move || crate::proxy::http_get(admin, "/metrics"))
        }
        None => crate::proxy::http_get(admin, "/metrics"),
    }
    .unwrap_or_else(|err| panic!("GET /metrics from {admin}: {err}"));
    let mut by_plane = HashMap::new();
    for line in text.lines() {
        let Some(series) = line.strip_prefix("spliced_tunnels_total{") else {
            continue;
        };
        let moved_by = series
            .split("dataplane=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no dataplane label in {line:?}"));
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        *by_plane.entry(moved_by.to_owned()).or_default() += count;
    }
    by_plane
}

/// Waits until the proxy at `admin` (see [`closed_by_plane`]) has closed at
/// least `at_least` tunnels and fails the test unless every one ran on `plane`.
pub fn assert_closed_on(
    admin: SocketAddr,
    netns: Option<&str>,
    plane: &str,
    at_least: u64,
    context: impl Fn() -> String,
) {
    let mut by_plane = HashMap::new();
    let enough = wait_until(WAIT, || {
        by_plane = closed_by_plane(admin, netns);
        by_plane.values().sum::<u64>() >= at_least
    });
    assert!(
        enough,
        "closed tunnels by data plane {by_plane:?}, expected at least {at_least} on {plane}:\n{}",
        context()
    );
    let elsewhere: Vec<_> = by_plane
        .iter()
        .filter(|(moved_by, &count)| *moved_by != plane && count > 0)
        .collect();
    assert!(
        elsewhere.is_empty(),
        "tunnels ran on another plane than {plane}: {by_plane:?}\n{}",
        context()
    );
}
