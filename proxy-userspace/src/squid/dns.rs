//! The resolver's squid.conf directives besides `dns_nameservers` and
//! `dns_timeout`: `hosts_file`, `positive_dns_ttl`, `negative_dns_ttl`,
//! `ipcache_size` and `happy_eyeballs_connect_timeout`. Values are kept as
//! written (`None` where the file says nothing); `crate::dns::DnsSettings`
//! applies Squid's defaults.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use super::{parse::parse_time_value, reader::Token};

/// The directives this module reads.
pub(super) const DIRECTIVES: [&str; 5] = [
    "hosts_file",
    "positive_dns_ttl",
    "negative_dns_ttl",
    "ipcache_size",
    "happy_eyeballs_connect_timeout",
];

/// Where `hosts_file` points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostsFile {
    /// `hosts_file none`: no static names.
    None,
    /// `hosts_file PATH`.
    Path(PathBuf),
}

/// The resolver's directives as the file sets them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsDirectives {
    /// `hosts_file` (Squid's default: `/etc/hosts`).
    pub hosts_file: Option<HostsFile>,
    /// `positive_dns_ttl`: the longest an answer is cached (Squid: 6 hours);
    /// a record's own shorter TTL wins.
    pub positive_ttl: Option<Duration>,
    /// `negative_dns_ttl`: how long a failed lookup is cached (Squid: 1 minute).
    pub negative_ttl: Option<Duration>,
    /// `ipcache_size`: the most names cached (Squid: 1024).
    pub ipcache_size: Option<u64>,
    /// `happy_eyeballs_connect_timeout`: milliseconds before the next address
    /// is tried while the previous attempt is still pending (Squid: 250).
    pub happy_eyeballs_delay: Option<Duration>,
}

impl DnsDirectives {
    /// Reads one of [`DIRECTIVES`]; the error is the message for the line.
    pub(super) fn apply(&mut self, directive: &str, args: &[Token]) -> Result<(), String> {
        match directive {
            "hosts_file" => {
                let [path] = args else {
                    return Err("expected a file name or none".into());
                };
                self.hosts_file = Some(match path.text() {
                    "none" => HostsFile::None,
                    path => {
                        // Read now so that a missing file is this line's error.
                        std::fs::read(path).map_err(|err| format!("cannot read {path}: {err}"))?;
                        HostsFile::Path(PathBuf::from(path))
                    }
                });
            }
            "positive_dns_ttl" => self.positive_ttl = Some(parse_time_value(args)?),
            "negative_dns_ttl" => self.negative_ttl = Some(parse_time_value(args)?),
            "ipcache_size" => {
                let [count] = args else {
                    return Err("expected a number of entries".into());
                };
                self.ipcache_size = Some(
                    count
                        .text()
                        .parse()
                        .map_err(|_| "expected a number of entries".to_owned())?,
                );
            }
            _ => {
                // Squid's type is an integer of milliseconds; a unit is accepted too.
                let value = match args {
                    [millis] => millis
                        .text()
                        .parse::<u64>()
                        .map(Duration::from_millis)
                        .map_err(|_| "expected milliseconds".to_owned())?,
                    _ => parse_time_value(args)?,
                };
                self.happy_eyeballs_delay = Some(value);
            }
        }
        Ok(())
    }

    /// The directives set, as squid.conf lines.
    pub(super) fn render(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.hosts_file {
            Some(HostsFile::None) => lines.push("hosts_file none".into()),
            Some(HostsFile::Path(path)) => lines.push(format!("hosts_file {}", path.display())),
            None => {}
        }
        let times = [
            ("positive_dns_ttl", self.positive_ttl),
            ("negative_dns_ttl", self.negative_ttl),
        ];
        for (name, value) in times {
            if let Some(value) = value {
                let mut line = String::new();
                let millis = value.as_millis();
                let _ = if millis.is_multiple_of(1000) {
                    write!(line, "{name} {} seconds", millis / 1000)
                } else {
                    write!(line, "{name} {millis} milliseconds")
                };
                lines.push(line);
            }
        }
        if let Some(size) = self.ipcache_size {
            lines.push(format!("ipcache_size {size}"));
        }
        if let Some(delay) = self.happy_eyeballs_delay {
            lines.push(format!(
                "happy_eyeballs_connect_timeout {}",
                delay.as_millis()
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::squid::{parse_str, ConfigError};

    fn dns_of(text: &str) -> DnsDirectives {
        let loaded = parse_str(text, "test.conf").unwrap_or_else(|err| panic!("{err}"));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        loaded.config.dns
    }

    fn error_of(text: &str) -> String {
        match parse_str(text, "test.conf") {
            Err(ConfigError::Invalid(diagnostic)) => diagnostic.to_string(),
            Err(err) => panic!("unexpected error {err}"),
            Ok(_) => panic!("parsed without error:\n{text}"),
        }
    }

    #[test]
    fn values_defaults_and_round_trip() {
        assert_eq!(dns_of(""), DnsDirectives::default());
        let text = "hosts_file none\npositive_dns_ttl 1 hour\nnegative_dns_ttl 5 seconds\n\
                    ipcache_size 64\nhappy_eyeballs_connect_timeout 100\n";
        let dns = dns_of(text);
        assert_eq!(
            dns,
            DnsDirectives {
                hosts_file: Some(HostsFile::None),
                positive_ttl: Some(Duration::from_secs(3600)),
                negative_ttl: Some(Duration::from_secs(5)),
                ipcache_size: Some(64),
                happy_eyeballs_delay: Some(Duration::from_millis(100)),
            }
        );
        assert_eq!(dns_of(&dns.render().join("\n")), dns);
        assert_eq!(
            dns_of("happy_eyeballs_connect_timeout 2 seconds").happy_eyeballs_delay,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            dns_of("hosts_file /dev/null").hosts_file,
            Some(HostsFile::Path("/dev/null".into()))
        );
    }

    #[test]
    fn bad_values_name_file_and_line() {
        for (text, needle) in [
            ("hosts_file /no/such/hosts", "cannot read /no/such/hosts"),
            ("hosts_file", "expected a file name"),
            ("positive_dns_ttl soon", "non-negative number"),
            ("negative_dns_ttl 1 fortnight", "unknown time unit"),
            ("ipcache_size -1", "number of entries"),
            (
                "happy_eyeballs_connect_timeout fast",
                "expected milliseconds",
            ),
        ] {
            let error = error_of(&format!("# comment\n{text}\n"));
            assert!(error.contains("test.conf:2"), "{error}");
            assert!(error.contains(needle), "{error}");
        }
    }
}
