//! Access log records: Squid's native `logformat squid` line, or JSON.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::config::LogFormat;

/// One finished transaction: a tunnel, or a request that was answered with an error.
#[derive(Clone, Debug, Serialize)]
pub struct AccessRecord {
    /// When the transaction ended (Squid's `%ts.%03tu`).
    #[serde(serialize_with = "serialize_time")]
    pub ts: SystemTime,
    /// From accept to the end, in milliseconds (`%tr`).
    pub duration_ms: u64,
    /// Client address (`%>a` logs only the IP).
    pub client: SocketAddr,
    /// Request method (`%rm`), `NONE` when no request line was read.
    pub method: String,
    /// Request target (`%ru`), `error:…` when none was read.
    pub target: String,
    /// HTTP status sent to the client (`%>Hs`), 0 when none was sent.
    pub status: u16,
    /// Squid result code (`%Ss`): `TCP_TUNNEL`, `TCP_DENIED`, `NONE_NONE`.
    pub result: &'static str,
    /// Hierarchy code (`%Sh`): `HIER_DIRECT` when an upstream was connected.
    pub hierarchy: &'static str,
    /// The upstream address connected to (`%<a`).
    pub upstream: Option<SocketAddr>,
    /// Bytes sent to the client, the response head included (`%<st`).
    pub bytes_to_client: u64,
    /// Bytes received from the client after the request head.
    pub bytes_from_client: u64,
    /// Data plane that moved the tunnel's bytes.
    pub dataplane: Option<&'static str>,
    /// How the tunnel or request ended, for operators (`closed`, `client_reset`, …).
    pub end: String,
}

fn serialize_time<S: serde::Serializer>(ts: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_rfc3339_millis(*ts).to_string())
}

impl AccessRecord {
    /// Squid's native format: `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
    pub fn squid_line(&self) -> String {
        let since_epoch = self.ts.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let upstream = self
            .upstream
            .map_or_else(|| "-".to_owned(), |addr| addr.ip().to_string());
        let mime = if self.result == "TCP_TUNNEL" || self.status == 0 {
            "-"
        } else {
            "text/plain"
        };
        format!(
            "{}.{:03} {:>6} {} {}/{:03} {} {} {} - {}/{} {}",
            since_epoch.as_secs(),
            since_epoch.subsec_millis(),
            self.duration_ms,
            plain_ip(self.client.ip()),
            self.result,
            self.status,
            self.bytes_to_client,
            self.method,
            self.target,
            self.hierarchy,
            upstream,
            mime,
        )
    }

    /// One JSON object.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("an AccessRecord always serializes")
    }
}

fn plain_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where records go.
pub struct AccessLog {
    format: LogFormat,
    sink: Mutex<Box<dyn Write + Send>>,
}

impl AccessLog {
    /// Opens `path` for appending, or standard output for `-`.
    pub fn open(path: &Path, format: LogFormat) -> io::Result<Self> {
        let sink: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(io::stdout())
        } else {
            Box::new(OpenOptions::new().create(true).append(true).open(path)?)
        };
        Ok(Self {
            format,
            sink: Mutex::new(sink),
        })
    }

    /// Writes one record as one line (one write(2), so lines never interleave).
    pub fn write(&self, record: &AccessRecord) {
        let mut line = match self.format {
            LogFormat::Squid => record.squid_line(),
            LogFormat::Json => record.json_line(),
        };
        line.push('\n');
        let mut sink = self
            .sink
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(err) = sink.write_all(line.as_bytes()).and_then(|()| sink.flush()) {
            log::error!("access log write failed: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squid_line_matches_the_istio_example() {
        let record = AccessRecord {
            ts: UNIX_EPOCH + Duration::from_millis(1_544_160_065_248),
            duration_ms: 228,
            client: "172.30.109.89:50000".parse().unwrap(),
            method: "CONNECT".into(),
            target: "en.wikipedia.org:443".into(),
            status: 200,
            result: "TCP_TUNNEL",
            hierarchy: "HIER_DIRECT",
            upstream: Some("91.198.174.192:443".parse().unwrap()),
            bytes_to_client: 87633,
            bytes_from_client: 1000,
            dataplane: Some("sockmap"),
            end: "closed".into(),
        };
        assert_eq!(
            record.squid_line(),
            "1544160065.248    228 172.30.109.89 TCP_TUNNEL/200 87633 CONNECT en.wikipedia.org:443 - HIER_DIRECT/91.198.174.192 -"
        );
        let json: serde_json::Value = serde_json::from_str(&record.json_line()).unwrap();
        assert_eq!(json["bytes_to_client"], 87633);
        assert_eq!(json["dataplane"], "sockmap");
        assert_eq!(json["ts"], "2018-12-07T05:21:05.248Z");
    }
}
