//! Access log records: Squid `logformat` lines (the native `squid` format by
//! default) or JSON.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    net::SocketAddr,
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;

use crate::{
    dataplane::PlaneKind,
    settings::AccessLogSpec,
    squid::{LogFields, LogFormat},
};

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
    /// The proxy address the client connected to (`%la`, `%lp`).
    pub local: Option<SocketAddr>,
    /// Request method (`%rm`), `NONE` when no request line was read.
    pub method: String,
    /// Request target (`%ru`), `error:…` when none was read.
    pub target: String,
    /// HTTP status sent to the client (`%>Hs`), 0 when none was sent.
    pub status: u16,
    /// Squid result code (`%Ss`): `TCP_TUNNEL`, `TCP_DENIED`, `NONE_NONE`.
    pub result: &'static str,
    /// Hierarchy code (`%Sh`): `HIER_DIRECT` when an origin was connected,
    /// `FIRSTUP_PARENT`, `ANY_OLD_PARENT` or `DEFAULT_PARENT` for a parent.
    pub hierarchy: &'static str,
    /// The upstream address connected to (`%<a`): the origin's, or the
    /// parent proxy's.
    pub upstream: Option<SocketAddr>,
    /// The parent proxy's `cache_peer` name (`%<A`), when the request went
    /// through one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The authenticated user (`%un`).
    pub user: Option<String>,
    /// Bytes sent to the client, the response head included (`%<st`).
    pub bytes_to_client: u64,
    /// Bytes received from the client after the request head.
    pub bytes_from_client: u64,
    /// Data plane that moved the tunnel's bytes.
    pub dataplane: Option<PlaneKind>,
    /// The packet plane: bytes the socket pump moved before the tunnel was
    /// promoted (absent when it was not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_before_promotion: Option<BytesBeforePromotion>,
    /// The SNI of the client's ClientHello, when an `ssl_bump peek` (or
    /// `sni_must_match_connect`) read it (`%ssl::>sni`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The answer's media type (`%mt`), from a forwarded answer's
    /// `Content-Type` (plain HTTP); error answers are `text/plain`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// How the tunnel or request ended, for operators (`closed`, `client_error`, …).
    pub end: String,
}

/// What the packet plane's socket pump moved before promotion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BytesBeforePromotion {
    /// Client → upstream.
    pub client_to_upstream: u64,
    /// Upstream → client.
    pub upstream_to_client: u64,
}

impl From<[u64; 2]> for BytesBeforePromotion {
    /// From `Progress::bytes_before_promotion`'s `[client → upstream,
    /// upstream → client]`.
    fn from([client_to_upstream, upstream_to_client]: [u64; 2]) -> Self {
        Self {
            client_to_upstream,
            upstream_to_client,
        }
    }
}

fn serialize_time<S: serde::Serializer>(ts: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_rfc3339_millis(*ts).to_string())
}

impl LogFields for AccessRecord {
    fn time(&self) -> SystemTime {
        self.ts
    }
    fn duration_ms(&self) -> u64 {
        self.duration_ms
    }
    fn client(&self) -> SocketAddr {
        self.client
    }
    fn upstream(&self) -> Option<SocketAddr> {
        self.upstream
    }
    fn local(&self) -> Option<SocketAddr> {
        self.local
    }
    fn result_code(&self) -> &str {
        self.result
    }
    fn status(&self) -> u16 {
        self.status
    }
    fn bytes_to_client(&self) -> u64 {
        self.bytes_to_client
    }
    fn bytes_from_client(&self) -> u64 {
        self.bytes_from_client
    }
    fn method(&self) -> &str {
        &self.method
    }
    fn url(&self) -> &str {
        &self.target
    }
    fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    fn hierarchy(&self) -> &str {
        self.hierarchy
    }
    fn upstream_name(&self) -> Option<&str> {
        // Squid's `%<A`: the peer's name, else the origin's host.
        self.peer.as_deref().or_else(|| {
            self.upstream?;
            let host = self
                .target
                .strip_prefix("http://")
                .unwrap_or(&self.target)
                .split('/')
                .next()?;
            Some(match host.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => host,
            })
        })
    }
    fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }
    fn mime_type(&self) -> Option<&str> {
        // Error answers carry a short text body; tunnels have no MIME type.
        self.mime_type.as_deref().or_else(|| {
            (!matches!(self.result, "TCP_TUNNEL" | "TCP_MISS") && self.bytes_to_client > 0)
                .then_some("text/plain")
        })
    }
}

/// How records are written.
#[derive(Clone, Debug)]
pub enum RecordFormat {
    /// A Squid `logformat`.
    Format(LogFormat),
    /// One JSON object per line.
    Json,
}

impl RecordFormat {
    /// Squid's native format: `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
    pub fn squid() -> Self {
        Self::Format(LogFormat::builtin("squid").expect("squid is a built-in log format"))
    }

    fn line(&self, record: &AccessRecord) -> String {
        match self {
            Self::Format(format) => format.format(record),
            Self::Json => serde_json::to_string(record).expect("an AccessRecord always serializes"),
        }
    }
}

struct Sink {
    format: RecordFormat,
    writer: Mutex<Box<dyn Write + Send>>,
}

/// Where records go: any number of destinations (none for `access_log none`).
pub struct AccessLog {
    sinks: Vec<Sink>,
}

impl AccessLog {
    /// Opens every destination (files for appending, `-` for standard output).
    pub fn open(specs: &[AccessLogSpec]) -> io::Result<Self> {
        let mut sinks = Vec::with_capacity(specs.len());
        for spec in specs {
            let writer: Box<dyn Write + Send> = if spec.path.as_os_str() == "-" {
                Box::new(io::stdout())
            } else {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&spec.path)
                    .map_err(|err| {
                        io::Error::new(
                            err.kind(),
                            format!("access log {}: {err}", spec.path.display()),
                        )
                    })?;
                Box::new(file)
            };
            sinks.push(Sink {
                format: spec.format.clone(),
                writer: Mutex::new(writer),
            });
        }
        Ok(Self { sinks })
    }

    /// Writes one record as one line to every destination (one write(2) each, so
    /// lines never interleave).
    pub fn write(&self, record: &AccessRecord) {
        for sink in &self.sinks {
            let mut line = sink.format.line(record);
            line.push('\n');
            let mut writer = sink
                .writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(err) = writer
                .write_all(line.as_bytes())
                .and_then(|()| writer.flush())
            {
                log::error!("access log write failed: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn istio_example() -> AccessRecord {
        AccessRecord {
            ts: UNIX_EPOCH + Duration::from_millis(1_544_160_065_248),
            duration_ms: 228,
            client: "172.30.109.89:50000".parse().unwrap(),
            local: None,
            method: "CONNECT".into(),
            target: "en.wikipedia.org:443".into(),
            status: 200,
            result: "TCP_TUNNEL",
            hierarchy: "HIER_DIRECT",
            upstream: Some("91.198.174.192:443".parse().unwrap()),
            user: None,
            bytes_to_client: 87633,
            bytes_from_client: 1000,
            dataplane: Some(PlaneKind::Sockmap),
            bytes_before_promotion: None,
            sni: None,
            mime_type: None,
            peer: None,
            end: "closed".into(),
        }
    }

    #[test]
    fn squid_line_matches_the_istio_example() {
        assert_eq!(
            RecordFormat::squid().line(&istio_example()),
            "1544160065.248    228 172.30.109.89 TCP_TUNNEL/200 87633 CONNECT en.wikipedia.org:443 - HIER_DIRECT/91.198.174.192 -"
        );
    }

    #[test]
    fn denials_log_like_squid() {
        let mut record = istio_example();
        record.status = 403;
        record.result = "TCP_DENIED";
        record.hierarchy = "HIER_NONE";
        record.upstream = None;
        record.bytes_to_client = 3970;
        assert_eq!(
            RecordFormat::squid().line(&record),
            "1544160065.248    228 172.30.109.89 TCP_DENIED/403 3970 CONNECT en.wikipedia.org:443 - HIER_NONE/- text/plain"
        );
    }

    #[test]
    fn parents_log_like_squid() {
        let mut record = istio_example();
        let names = LogFormat::parse("names", "%Sh/%<a:%<p %<A").unwrap();
        assert_eq!(
            RecordFormat::Format(names.clone()).line(&record),
            "HIER_DIRECT/91.198.174.192:443 en.wikipedia.org"
        );
        record.hierarchy = "FIRSTUP_PARENT";
        record.upstream = Some("10.0.0.5:3128".parse().unwrap());
        record.peer = Some("corp".into());
        assert!(RecordFormat::squid()
            .line(&record)
            .ends_with(" FIRSTUP_PARENT/10.0.0.5 -"));
        assert_eq!(
            RecordFormat::Format(names).line(&record),
            "FIRSTUP_PARENT/10.0.0.5:3128 corp"
        );
        let json: serde_json::Value =
            serde_json::from_str(&RecordFormat::Json.line(&record)).unwrap();
        assert_eq!(json["peer"], "corp");
        assert_eq!(json["hierarchy"], "FIRSTUP_PARENT");
    }

    #[test]
    fn json_has_the_documented_fields() {
        let json: serde_json::Value =
            serde_json::from_str(&RecordFormat::Json.line(&istio_example())).unwrap();
        for field in [
            "ts",
            "duration_ms",
            "client",
            "method",
            "target",
            "status",
            "result",
            "upstream",
            "bytes_to_client",
            "bytes_from_client",
            "dataplane",
        ] {
            assert!(json.get(field).is_some(), "{field} missing in {json}");
        }
        assert_eq!(json["bytes_to_client"], 87633);
        assert_eq!(json["ts"], "2018-12-07T05:21:05.248Z");
    }
}
