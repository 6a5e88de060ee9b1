//! Squid `logformat` specifications and the access log lines they produce.
//!
//! A specification is text with `%` codes, each
//! `%[ENCODING][-][0][WIDTH][.MAX][{ARG}]CODE`:
//! * ENCODING: `"` (quoted string), `[` (Squid's log_mime_hdrs escaping: space,
//!   `"`, `%`, `[`, `]`, `\` and non-printable bytes as `%XX`), `#` (URL
//!   encoding) or `'` (as is). Without one, control characters are still
//!   escaped as `%XX` so that no value can forge a log line.
//! * `-` aligns left; `0` pads numbers with zeros; WIDTH is the minimum width
//!   (right-aligned by default); `.MAX` truncates.
//! * `{ARG}`: a header name for `>h`, or a strftime format for `tl`/`tg`.
//!
//! Codes a tunnel has: `ts` (seconds since the epoch), `tu` (milliseconds of the
//! second), `tl` (local time, `%d/%b/%Y:%H:%M:%S %z` by default), `tg` (the same
//! in UTC), `tr` (duration in milliseconds), `>a`/`>p` (client address/port),
//! `<a`/`<p` (upstream address/port: the origin's or the parent's), `<A`
//! (the parent's `cache_peer` name, else the origin's host), `la`/`lp` (local address/port), `Ss`
//! (result code), `>Hs` (status sent), `<st`/`>st` (bytes sent to/received from
//! the client), `rm` (method), `ru` (URL, `host:port`), `rv` (protocol version,
//! `1.1`), `un`/`ul` (user name), `ui` (ident, always `-`), `Sh` (hierarchy
//! code), `mt` (MIME type), `>h` (request header, with `{Name}`), `%%`. Other
//! Squid codes are configuration errors. Missing values print as `-`.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{SystemTime, UNIX_EPOCH},
};

use jiff::{tz::TimeZone, Timestamp};

/// What a log line is made from: implemented by the proxy's access record.
pub trait LogFields {
    /// When the transaction ended (`%ts`, `%tu`, `%tl`, `%tg`).
    fn time(&self) -> SystemTime;
    /// Its duration in milliseconds (`%tr`).
    fn duration_ms(&self) -> u64;
    /// The client's address (`%>a`, `%>p`).
    fn client(&self) -> SocketAddr;
    /// The upstream address connected to (`%<a`, `%<p`).
    fn upstream(&self) -> Option<SocketAddr>;
    /// The proxy's own address on the client connection (`%la`, `%lp`).
    fn local(&self) -> Option<SocketAddr>;
    /// Squid result code, such as `TCP_TUNNEL` or `TCP_DENIED` (`%Ss`).
    fn result_code(&self) -> &str;
    /// HTTP status sent to the client, 0 when none (`%>Hs`).
    fn status(&self) -> u16;
    /// Bytes sent to the client (`%<st`).
    fn bytes_to_client(&self) -> u64;
    /// Bytes received from the client (`%>st`).
    fn bytes_from_client(&self) -> u64;
    /// The request method (`%rm`).
    fn method(&self) -> &str;
    /// The request URL, `host:port` for CONNECT (`%ru`).
    fn url(&self) -> &str;
    /// The authenticated user (`%un`, `%ul`).
    fn user(&self) -> Option<&str>;
    /// Hierarchy code, such as `HIER_DIRECT` or `HIER_NONE` (`%Sh`).
    fn hierarchy(&self) -> &str;
    /// MIME type of the answer (`%mt`).
    fn mime_type(&self) -> Option<&str>;
    /// A request header (`%{Name}>h`); none by default.
    fn request_header(&self, _name: &str) -> Option<&str> {
        None
    }
    /// The parent proxy's name, else the origin's host (`%<A`); none by
    /// default.
    fn upstream_name(&self) -> Option<&str> {
        None
    }
    /// The SNI of the client's ClientHello, when a peek rule read it
    /// (`%ssl::>sni`); none by default.
    fn sni(&self) -> Option<&str> {
        None
    }
}

/// A named log format: its specification and the parsed items.
#[derive(Clone, Debug)]
pub struct LogFormat {
    /// The name access_log lines use.
    pub name: String,
    /// The specification as written.
    pub spec: String,
    items: Vec<Item>,
}

impl PartialEq for LogFormat {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.spec == other.spec
    }
}

impl Eq for LogFormat {}

#[derive(Clone, Debug)]
enum Item {
    Literal(String),
    Field(Field),
}

#[derive(Clone, Debug)]
struct Field {
    code: Code,
    encoding: Encoding,
    left: bool,
    zero: bool,
    width: usize,
    max: Option<usize>,
    arg: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Default,
    Quoted,
    Squid,
    Url,
    Raw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Code {
    Seconds,
    Millis,
    LocalTime,
    GmtTime,
    Duration,
    ClientAddr,
    ClientPort,
    UpstreamAddr,
    UpstreamName,
    UpstreamPort,
    LocalAddr,
    LocalPort,
    Result,
    Status,
    BytesToClient,
    BytesFromClient,
    Method,
    Url,
    Version,
    User,
    Ident,
    Hierarchy,
    MimeType,
    RequestHeader,
    Sni,
    Percent,
}

/// Codes, longest first where one is a prefix of another.
const CODES: &[(&str, Code)] = &[
    ("ssl::>sni", Code::Sni),
    (">Hs", Code::Status),
    (">st", Code::BytesFromClient),
    ("<st", Code::BytesToClient),
    (">a", Code::ClientAddr),
    (">p", Code::ClientPort),
    ("<a", Code::UpstreamAddr),
    ("<A", Code::UpstreamName),
    ("<p", Code::UpstreamPort),
    (">h", Code::RequestHeader),
    ("la", Code::LocalAddr),
    ("lp", Code::LocalPort),
    ("ts", Code::Seconds),
    ("tu", Code::Millis),
    ("tl", Code::LocalTime),
    ("tg", Code::GmtTime),
    ("tr", Code::Duration),
    ("Ss", Code::Result),
    ("Sh", Code::Hierarchy),
    ("rm", Code::Method),
    ("ru", Code::Url),
    ("rv", Code::Version),
    ("un", Code::User),
    ("ul", Code::User),
    ("ui", Code::Ident),
    ("mt", Code::MimeType),
    ("%", Code::Percent),
];

/// Squid's default `%tl` layout.
const DEFAULT_TIME_FORMAT: &str = "%d/%b/%Y:%H:%M:%S %z";

/// Built-in formats: name and specification.
const BUILTIN: &[(&str, &str)] = &[
    (
        "squid",
        "%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt",
    ),
    (
        "common",
        "%>a %[ui %[un [%tl] \"%rm %ru HTTP/%rv\" %>Hs %<st %Ss:%Sh",
    ),
    (
        "combined",
        "%>a %[ui %[un [%tl] \"%rm %ru HTTP/%rv\" %>Hs %<st \"%{Referer}>h\" \"%{User-Agent}>h\" %Ss:%Sh",
    ),
];

impl LogFormat {
    /// Parses a specification; the error names the offending code.
    pub fn parse(name: &str, spec: &str) -> Result<Self, String> {
        Ok(Self {
            name: name.to_owned(),
            spec: spec.to_owned(),
            items: parse_spec(spec)?,
        })
    }

    /// A built-in format: `squid`, `common` or `combined`.
    pub fn builtin(name: &str) -> Option<Self> {
        BUILTIN
            .iter()
            .find(|(builtin, _)| *builtin == name)
            .and_then(|(name, spec)| Self::parse(name, spec).ok())
    }

    /// Whether `name` is a built-in format.
    pub fn is_builtin(name: &str) -> bool {
        BUILTIN.iter().any(|(builtin, _)| *builtin == name)
    }

    /// One log line (without the newline); `%tl` in the system time zone.
    pub fn format(&self, rec: &impl LogFields) -> String {
        self.format_in(rec, &TimeZone::system())
    }

    /// One log line, with `%tl` in the time zone `utc_offset_seconds` east of UTC.
    pub fn format_with_offset(&self, rec: &impl LogFields, utc_offset_seconds: i32) -> String {
        let tz = jiff::tz::Offset::from_seconds(utc_offset_seconds)
            .map(jiff::tz::Offset::to_time_zone)
            .unwrap_or(TimeZone::UTC);
        self.format_in(rec, &tz)
    }

    fn format_in(&self, rec: &impl LogFields, tz: &TimeZone) -> String {
        let mut line = String::new();
        for item in &self.items {
            match item {
                Item::Literal(text) => line.push_str(text),
                Item::Field(field) => field.write(rec, tz, &mut line),
            }
        }
        line
    }
}

fn parse_spec(spec: &str) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    let mut literal = String::new();
    let mut rest = spec;
    while let Some(at) = rest.find('%') {
        literal.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (field, used) = parse_field(after).map_err(|message| {
            let shown: String = rest[at..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            format!("{message}: {shown}")
        })?;
        rest = &after[used..];
        match field.code {
            Code::Percent => literal.push('%'),
            _ => {
                if !literal.is_empty() {
                    items.push(Item::Literal(std::mem::take(&mut literal)));
                }
                items.push(Item::Field(field));
            }
        }
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        items.push(Item::Literal(literal));
    }
    Ok(items)
}

/// Parses what follows a `%`; returns the field and the bytes consumed.
fn parse_field(text: &str) -> Result<(Field, usize), String> {
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut field = Field {
        code: Code::Percent,
        encoding: Encoding::Default,
        left: false,
        zero: false,
        width: 0,
        max: None,
        arg: None,
    };
    if text.starts_with('%') {
        return Ok((field, 1));
    }
    if let Some(&b) = bytes.first() {
        let encoding = match b {
            b'"' => Some(Encoding::Quoted),
            b'[' => Some(Encoding::Squid),
            b'#' => Some(Encoding::Url),
            b'\'' => Some(Encoding::Raw),
            b'/' => return Err("shell escaping (%/) is not supported".into()),
            _ => None,
        };
        if let Some(encoding) = encoding {
            field.encoding = encoding;
            at += 1;
        }
    }
    if bytes.get(at) == Some(&b'-') {
        field.left = true;
        at += 1;
    }
    if bytes.get(at) == Some(&b'0') {
        field.zero = true;
        at += 1;
    }
    let digits = |from: usize| {
        bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let width_len = digits(at);
    if width_len > 0 {
        field.width = text[at..at + width_len]
            .parse()
            .map_err(|_| "field width too large".to_owned())?;
        if field.width > 1024 {
            return Err("field width too large".into());
        }
        at += width_len;
    }
    if bytes.get(at) == Some(&b'.') {
        let max_len = digits(at + 1);
        if max_len == 0 {
            return Err("expected a number after '.'".into());
        }
        field.max = Some(
            text[at + 1..at + 1 + max_len]
                .parse()
                .map_err(|_| "field width too large".to_owned())?,
        );
        at += 1 + max_len;
    }
    let take_arg = |at: &mut usize| -> Result<Option<String>, String> {
        if bytes.get(*at) != Some(&b'{') {
            return Ok(None);
        }
        let close = text[*at..]
            .find('}')
            .ok_or_else(|| "unterminated {argument}".to_owned())?;
        let arg = text[*at + 1..*at + close].to_owned();
        *at += close + 1;
        Ok(Some(arg))
    };
    field.arg = take_arg(&mut at)?;
    let (code, code_len) = CODES
        .iter()
        .find(|(name, _)| text[at..].starts_with(name))
        .map(|&(name, code)| (code, name.len()))
        .ok_or_else(|| "unknown or unsupported logformat code".to_owned())?;
    at += code_len;
    if field.arg.is_none() {
        field.arg = take_arg(&mut at)?;
    }
    field.code = code;
    match (code, &field.arg) {
        (Code::RequestHeader, None) => return Err("%>h needs a header name: %{Name}>h".into()),
        (Code::RequestHeader, Some(name)) if name.contains(':') => {
            return Err("header member selection (%{Name:member}>h) is not supported".into())
        }
        (Code::LocalTime | Code::GmtTime, Some(format)) => {
            jiff::fmt::strtime::format(format.as_str(), Timestamp::UNIX_EPOCH)
                .map_err(|err| format!("bad time format: {err}"))?;
        }
        (Code::RequestHeader | Code::LocalTime | Code::GmtTime, _) => {}
        (Code::Percent, _) => return Err("'%%' takes no modifiers".into()),
        (_, Some(_)) => return Err("this code takes no {argument}".into()),
        (_, None) => {}
    }
    Ok((field, at))
}

/// An address as Squid logs it: IPv4-mapped IPv6 as plain IPv4.
fn plain_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

impl Field {
    fn value(&self, rec: &impl LogFields, tz: &TimeZone) -> Option<String> {
        let since_epoch = || rec.time().duration_since(UNIX_EPOCH).unwrap_or_default();
        Some(match self.code {
            Code::Seconds => since_epoch().as_secs().to_string(),
            Code::Millis => since_epoch().subsec_millis().to_string(),
            Code::LocalTime | Code::GmtTime => {
                let timestamp = Timestamp::try_from(rec.time()).unwrap_or(Timestamp::UNIX_EPOCH);
                let tz = if self.code == Code::GmtTime {
                    TimeZone::UTC
                } else {
                    tz.clone()
                };
                let zoned = timestamp.to_zoned_datetime(tz);
                let layout = self.arg.as_deref().unwrap_or(DEFAULT_TIME_FORMAT);
                jiff::fmt::strtime::format(layout, &zoned).ok()?
            }
            Code::Duration => rec.duration_ms().to_string(),
            Code::ClientAddr => plain_ip(rec.client().ip()),
            Code::ClientPort => rec.client().port().to_string(),
            Code::UpstreamAddr => plain_ip(rec.upstream()?.ip()),
            Code::UpstreamName => rec.upstream_name()?.to_owned(),
            Code::UpstreamPort => rec.upstream()?.port().to_string(),
            Code::LocalAddr => plain_ip(rec.local()?.ip()),
            Code::LocalPort => rec.local()?.port().to_string(),
            Code::Result => rec.result_code().to_owned(),
            Code::Status => rec.status().to_string(),
            Code::BytesToClient => rec.bytes_to_client().to_string(),
            Code::BytesFromClient => rec.bytes_from_client().to_string(),
            Code::Method => rec.method().to_owned(),
            Code::Url => rec.url().to_owned(),
            Code::Version => "1.1".to_owned(),
            Code::User => rec.user().filter(|user| !user.is_empty())?.to_owned(),
            Code::Ident => return None,
            Code::Hierarchy => rec.hierarchy().to_owned(),
            Code::MimeType => rec.mime_type()?.to_owned(),
            Code::RequestHeader => rec
                .request_header(self.arg.as_deref().unwrap_or_default())?
                .to_owned(),
            Code::Sni => rec.sni()?.to_owned(),
            Code::Percent => "%".to_owned(),
        })
    }

    fn write(&self, rec: &impl LogFields, tz: &TimeZone, out: &mut String) {
        let raw = self.value(rec, tz);
        let numeric = raw
            .as_deref()
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        let mut value = match raw {
            Some(value) if !value.is_empty() => encode(&value, self.encoding),
            _ => "-".to_owned(),
        };
        if let Some(max) = self.max {
            if let Some((cut, _)) = value.char_indices().nth(max) {
                value.truncate(cut);
            }
        }
        let len = value.chars().count();
        if len >= self.width {
            out.push_str(&value);
        } else if self.left {
            out.push_str(&value);
            out.extend(std::iter::repeat_n(' ', self.width - len));
        } else {
            let pad = if self.zero && numeric { '0' } else { ' ' };
            out.extend(std::iter::repeat_n(pad, self.width - len));
            out.push_str(&value);
        }
    }
}

fn encode(value: &str, encoding: Encoding) -> String {
    let mut out = String::with_capacity(value.len());
    match encoding {
        Encoding::Raw => out.push_str(value),
        Encoding::Default => {
            for c in value.chars() {
                if c.is_control() {
                    percent(&mut out, c);
                } else {
                    out.push(c);
                }
            }
        }
        Encoding::Squid => {
            for c in value.chars() {
                if c.is_ascii_graphic() && !matches!(c, '"' | '%' | '[' | ']' | '\\') {
                    out.push(c);
                } else {
                    percent(&mut out, c);
                }
            }
        }
        Encoding::Url => {
            for c in value.chars() {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                    out.push(c);
                } else {
                    percent(&mut out, c);
                }
            }
        }
        Encoding::Quoted => {
            out.push('"');
            for c in value.chars() {
                match c {
                    '"' | '\\' => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if c.is_control() => percent(&mut out, c),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
    }
    out
}

fn percent(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for byte in c.encode_utf8(&mut buf).bytes() {
        let _ = write!(out, "%{byte:02X}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The record of the access_log module's Istio example.
    struct Sample {
        user: Option<&'static str>,
        upstream: Option<SocketAddr>,
        status: u16,
    }

    impl LogFields for Sample {
        fn time(&self) -> SystemTime {
            UNIX_EPOCH + Duration::from_millis(1_544_160_065_248)
        }
        fn duration_ms(&self) -> u64 {
            228
        }
        fn client(&self) -> SocketAddr {
            "[::ffff:172.30.109.89]:50000".parse().unwrap()
        }
        fn upstream(&self) -> Option<SocketAddr> {
            self.upstream
        }
        fn local(&self) -> Option<SocketAddr> {
            Some("10.0.0.2:3128".parse().unwrap())
        }
        fn result_code(&self) -> &str {
            "TCP_TUNNEL"
        }
        fn status(&self) -> u16 {
            self.status
        }
        fn bytes_to_client(&self) -> u64 {
            87633
        }
        fn bytes_from_client(&self) -> u64 {
            1000
        }
        fn method(&self) -> &str {
            "CONNECT"
        }
        fn url(&self) -> &str {
            "en.wikipedia.org:443"
        }
        fn user(&self) -> Option<&str> {
            self.user
        }
        fn hierarchy(&self) -> &str {
            "HIER_DIRECT"
        }
        fn mime_type(&self) -> Option<&str> {
            None
        }
        fn request_header(&self, name: &str) -> Option<&str> {
            name.eq_ignore_ascii_case("user-agent")
                .then_some("curl/8.0 \"x\"")
        }
    }

    fn sample() -> Sample {
        Sample {
            user: None,
            upstream: Some("91.198.174.192:443".parse().unwrap()),
            status: 200,
        }
    }

    #[test]
    fn squid_format_matches_the_istio_example() {
        let squid = LogFormat::builtin("squid").unwrap();
        assert_eq!(
            squid.format(&sample()),
            "1544160065.248    228 172.30.109.89 TCP_TUNNEL/200 87633 CONNECT en.wikipedia.org:443 - HIER_DIRECT/91.198.174.192 -"
        );
        let refused = Sample {
            user: Some("alice smith"),
            upstream: None,
            status: 0,
        };
        assert_eq!(
            squid.format(&refused),
            "1544160065.248    228 172.30.109.89 TCP_TUNNEL/000 87633 CONNECT en.wikipedia.org:443 alice%20smith HIER_DIRECT/- -"
        );
    }

    #[test]
    fn common_and_combined_formats() {
        let common = LogFormat::builtin("common").unwrap();
        assert_eq!(
            common.format_with_offset(&sample(), 0),
            "172.30.109.89 - - [07/Dec/2018:05:21:05 +0000] \"CONNECT en.wikipedia.org:443 HTTP/1.1\" 200 87633 TCP_TUNNEL:HIER_DIRECT"
        );
        assert_eq!(
            common.format_with_offset(&sample(), 3600 + 1800),
            "172.30.109.89 - - [07/Dec/2018:06:51:05 +0130] \"CONNECT en.wikipedia.org:443 HTTP/1.1\" 200 87633 TCP_TUNNEL:HIER_DIRECT"
        );
        let combined = LogFormat::builtin("combined").unwrap();
        assert!(combined
            .format_with_offset(&sample(), 0)
            .ends_with("\"-\" \"curl/8.0 \"x\"\" TCP_TUNNEL:HIER_DIRECT"));
        assert!(LogFormat::builtin("nope").is_none());
    }

    #[test]
    fn every_code_and_modifier() {
        let cases = [
            ("%ts", "1544160065"),
            ("%tu", "248"),
            ("%03tu|%5tu|%-5tu|", "248|  248|248  |"),
            ("%6tr", "   228"),
            ("%06tr", "000228"),
            ("%>a:%>p", "172.30.109.89:50000"),
            ("%<a:%<p", "91.198.174.192:443"),
            ("%la:%lp", "10.0.0.2:3128"),
            ("%Ss %>Hs %<st %>st", "TCP_TUNNEL 200 87633 1000"),
            ("%rm %ru %rv", "CONNECT en.wikipedia.org:443 1.1"),
            ("%un %ul %ui %[un", "- - - -"),
            ("%Sh %mt %%", "HIER_DIRECT - %"),
            ("%tg", "07/Dec/2018:05:21:05 +0000"),
            ("%{%Y-%m-%dT%H:%M:%S}tg", "2018-12-07T05:21:05"),
            ("%tg{%H}", "05"),
            ("%.3ru", "en."),
            ("%#ru", "en.wikipedia.org%3A443"),
            ("%\"rm", "\"CONNECT\""),
            ("%'rm", "CONNECT"),
            ("%{User-Agent}>h", "curl/8.0 \"x\""),
            ("%{Referer}>h", "-"),
            ("100%% %08>Hs", "100% 00000200"),
            ("%08Ss", "TCP_TUNNEL"),
            ("%012Ss", "  TCP_TUNNEL"),
            ("literal only", "literal only"),
        ];
        for (spec, expected) in cases {
            let format = LogFormat::parse("t", spec).unwrap_or_else(|err| panic!("{spec}: {err}"));
            assert_eq!(format.format_with_offset(&sample(), 0), expected, "{spec}");
        }
    }

    #[test]
    fn user_names_are_escaped() {
        let rec = Sample {
            user: Some("eve\nforged line"),
            upstream: None,
            status: 403,
        };
        let plain = LogFormat::parse("t", "%un").unwrap();
        assert_eq!(plain.format(&rec), "eve%0Aforged line");
        let squid = LogFormat::parse("t", "%[un").unwrap();
        assert_eq!(squid.format(&rec), "eve%0Aforged%20line");
        let raw = LogFormat::parse("t", "%'un").unwrap();
        assert_eq!(raw.format(&rec), "eve\nforged line");
    }

    #[test]
    fn bad_specifications() {
        for bad in [
            "%",
            "%ue",
            "%>A",
            "%<Hs",
            "%{x}ts",
            "%>h",
            "%{a:b}>h",
            "%/un",
            "%.ts",
            "%{unterminated",
            "%{%}tl",
            "%5%",
            "%99999999999999999999tr",
        ] {
            assert!(LogFormat::parse("t", bad).is_err(), "{bad}");
        }
        let err = LogFormat::parse("t", "%ts %zz rest").unwrap_err();
        assert!(err.contains("%zz"), "{err}");
    }
}
