//! Printing the effective configuration back as `squid.conf` text, one line per
//! directive in normalized form (what `squid -k parse` shows), such that parsing
//! the output gives the same rules again.

use std::{borrow::Cow, fmt::Write as _, time::Duration};

use super::{acl::AclKind, AccessLogTarget, HttpPort, SquidConfig};

fn duration(value: Duration) -> String {
    let millis = value.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{} seconds", millis / 1000)
    } else {
        format!("{millis} milliseconds")
    }
}

/// A token the reader gives back as `text`: as it is when it is a plain word,
/// else quoted (whitespace, or a leading `"` or `#`, which would start a
/// quoted string or a comment).
fn word(text: &str) -> Cow<'_, str> {
    let plain =
        !text.is_empty() && !text.starts_with(['"', '#']) && !text.chars().any(char::is_whitespace);
    if plain {
        return Cow::Borrowed(text);
    }
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
    Cow::Owned(format!("\"{escaped}\""))
}

fn on_off(value: bool) -> &'static str {
    if value {
        "on"
    } else {
        "off"
    }
}

impl SquidConfig {
    /// The effective configuration as `squid.conf` text: includes flattened,
    /// ACL value files expanded inline, ignored directives and built-in
    /// definitions left out, values normalized (`10.0.0.0/255.0.0.0` becomes
    /// `10.0.0.0/8`, `stdio:/x` becomes `/x`, times are in seconds). Parsing the
    /// output yields the same rules.
    pub fn render_effective(&self) -> String {
        let mut out = String::new();
        // `write!` to a String cannot fail.
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        for port in &self.http_ports {
            let listen = HttpPort {
                name: None,
                ..port.clone()
            };
            match &port.name {
                None => line(format!("http_port {listen}")),
                Some(name) => line(format!(
                    "http_port {listen} {}",
                    word(&format!("name={name}"))
                )),
            }
        }
        for format in &self.logformats {
            line(format!("logformat {} {}", format.name, format.spec));
        }
        for target in &self.access_logs {
            match target {
                AccessLogTarget::None => line("access_log none".into()),
                AccessLogTarget::File { path, format } => {
                    let path = path.display().to_string();
                    // A file named `none` (written `stdio:none`) keeps its prefix.
                    let path = if path == "none" {
                        format!("stdio:{path}")
                    } else {
                        path
                    };
                    // A name the reader would take for an option or a comment
                    // is written as `logformat=NAME`.
                    let format = if format.name.contains('=') || format.name.starts_with('#') {
                        format!("logformat={}", format.name)
                    } else {
                        format.name.clone()
                    };
                    line(format!("access_log {} {}", word(&path), word(&format)))
                }
            }
        }
        let timeouts = [
            ("connect_timeout", self.timeouts.connect),
            ("read_timeout", self.timeouts.read),
            ("client_lifetime", self.timeouts.client_lifetime),
            ("request_timeout", self.timeouts.request),
            ("shutdown_lifetime", self.timeouts.shutdown_lifetime),
            ("dns_timeout", self.timeouts.dns),
        ];
        for (name, value) in timeouts {
            if let Some(value) = value {
                line(format!("{name} {}", duration(value)));
            }
        }
        if let Some(max) = self.client_ip_max_connections {
            line(format!("client_ip_max_connections {max}"));
        }
        // Plain-HTTP header directives, when not Squid's defaults.
        if !self.headers.via {
            line("via off".into());
        }
        if self.headers.forwarded_for != crate::http_forward::ForwardedFor::On {
            line(format!(
                "forwarded_for {}",
                self.headers.forwarded_for.as_str()
            ));
        }
        if !self.dns_nameservers.is_empty() {
            let mut text = String::from("dns_nameservers");
            for server in &self.dns_nameservers {
                let _ = write!(text, " {server}");
            }
            line(text);
        }
        for text in self.dns.render() {
            line(text);
        }
        if let Some(auth) = &self.auth {
            line(format!(
                "auth_param basic program {} {}",
                auth.program.display(),
                auth.password_file.display()
            ));
            line(format!("auth_param basic realm {}", auth.realm));
            line(format!(
                "auth_param basic casesensitive {}",
                on_off(auth.case_sensitive)
            ));
            if let Some(children) = &auth.children {
                line(format!("auth_param basic children {children}"));
            }
            if let Some(ttl) = auth.credentials_ttl {
                line(format!("auth_param basic credentialsttl {}", duration(ttl)));
            }
            if let Some(utf8) = auth.utf8 {
                line(format!("auth_param basic utf8 {}", on_off(utf8)));
            }
        }
        for acl in &self.acls {
            if acl.loc.is_none() || matches!(acl.kind, AclKind::Unsupported { .. }) {
                continue;
            }
            let values = acl.kind.render_values(acl.builtin_values);
            let has_value = acl.kind.len() > acl.builtin_values;
            let mut text = format!("acl {} {}", acl.name, acl.kind.type_name());
            for value in &values {
                let _ = write!(text, " {value}");
            }
            if !has_value {
                // An ACL whose value file was empty: keep it defined, matching nothing.
                text.push_str(" \"/dev/null\"");
            }
            line(text);
        }
        self.render_peers(&mut line);
        for rule in &self.rules {
            line(rule.to_string());
        }
        for rule in self.proxy_protocol_rules() {
            line(rule);
        }
        for rule in &self.tls.bump {
            line(rule.to_string());
        }
        for rule in &self.tls.unsupported {
            line(rule.to_string());
        }
        if self.tls.sni_check != super::SniCheck::Off {
            line(format!(
                "sni_must_match_connect {}",
                self.tls.sni_check.as_str()
            ));
        }
        out
    }
}
