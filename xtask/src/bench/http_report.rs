//! The plain-HTTP cases in the report: their table, JSON and failure notes.

use serde_json::{json, Value};

use super::{
    contenders::Contender,
    http_rate::{size_id, HttpCase, HttpResult},
    report::{finite, short, Table},
    Settings,
};

type HttpResults = [(HttpCase, Result<HttpResult, String>)];

/// The JSON records of the plain-HTTP cases.
pub fn to_json(results: &HttpResults) -> Vec<Value> {
    results
        .iter()
        .map(|(case, r)| match r {
            Ok(r) => json!({
                "id": case.id(),
                "contender": case.contender.id(),
                "body_bytes": case.body,
                "clients": r.clients,
                "secs": r.secs,
                "requests": r.requests,
                "per_sec": r.per_sec,
                "mib_per_sec": r.mib_per_sec(),
                "p50_ms": finite(r.p50_ms),
                "p99_ms": finite(r.p99_ms),
                "client_connections": r.client_connections,
                "origin_connections": r.origin_connections,
                "errors": r.errors,
                "first_error": r.first_error,
            }),
            Err(err) => json!({ "id": case.id(), "contender": case.contender.id(), "error": err }),
        })
        .collect()
}

/// The plain-HTTP table, if any case ran.
pub fn table(results: &HttpResults, settings: &Settings) -> Option<Table> {
    if results.is_empty() {
        return None;
    }
    let rows = results
        .iter()
        .map(|(case, r)| {
            let mut row = vec![case.label().to_owned(), size_id(case.body)];
            match r {
                Ok(r) => {
                    row.push(format!("{:.0}", r.per_sec));
                    row.push(format!("{:.0}", r.mib_per_sec()));
                    row.push(format!("{:.2}", r.p50_ms));
                    row.push(format!("{:.2}", r.p99_ms));
                    row.push(r.client_connections.to_string());
                    row.push(r.origin_connections.to_string());
                    row.push(match &r.first_error {
                        Some(err) => format!("{} ({})", r.errors, short(err, 60)),
                        None => r.errors.to_string(),
                    });
                }
                Err(err) => {
                    row.push(short(err, 80));
                    row.extend(std::iter::repeat_n(String::new(), 6));
                }
            }
            row
        })
        .collect();
    Some(Table {
        title: format!(
            "Plain HTTP: {} keep-alive clients sending `GET http://…` one after another for \
             {:.0} s on loopback (direct: the same requests to the origin itself)",
            settings.http_clients, settings.setup_secs
        ),
        header: [
            "proxy",
            "body",
            "requests/s",
            "MiB/s",
            "p50 ms",
            "p99 ms",
            "client conns",
            "origin conns",
            "errors",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        note: goal_note(results),
    })
}

/// spliced's requests/s against Squid's and tinyproxy's, per body size.
fn goal_note(results: &HttpResults) -> Option<String> {
    let rate = |contender, body| {
        results.iter().find_map(|(case, r)| {
            (case.contender == contender && case.body == body)
                .then(|| r.as_ref().ok().filter(|r| r.errors == 0).map(|r| r.per_sec))
                .flatten()
        })
    };
    let mut parts = Vec::new();
    let mut met = true;
    let mut bodies: Vec<usize> = results.iter().map(|(case, _)| case.body).collect();
    bodies.dedup();
    for body in bodies {
        let Some(spliced) = rate(Contender::Splice, body) else {
            continue;
        };
        let mut versus = Vec::new();
        for other in [Contender::Squid, Contender::Tinyproxy] {
            if let Some(theirs) = rate(other, body) {
                met &= spliced > theirs;
                versus.push(format!("{:.2}× {}", spliced / theirs, other.label()));
            }
        }
        if !versus.is_empty() {
            parts.push(format!("{}: {}", size_id(body), versus.join(", ")));
        }
    }
    (!parts.is_empty()).then(|| {
        format!(
            "spliced's requests/s in this run: {} (goal: ahead of both, {}). Client conns = \
             connections the clients opened (one each when the proxy kept every one alive); \
             origin conns = connections the origin accepted (upstream keep-alive).",
            parts.join("; "),
            if met { "met" } else { "not met" }
        )
    })
}

/// Failures worth listing under the tables.
pub fn notes(results: &HttpResults) -> Vec<String> {
    results
        .iter()
        .filter_map(|(case, r)| match r {
            Err(err) => Some(format!("{}: {err}", case.id())),
            Ok(r) if r.errors > 0 => Some(format!(
                "{}: {} errors, first: {}",
                case.id(),
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            )),
            Ok(_) => None,
        })
        .collect()
}
