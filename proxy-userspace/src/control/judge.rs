//! `Judge`: one request's policy decision (`http_access` and the built-in
//! policy), with its credentials checked once.

use super::*;

/// The `auth_param basic` settings in force, if any.
pub(super) fn basic_auth(settings: &Settings) -> Option<&BasicAuth> {
    match &settings.policy {
        Policy::Squid(squid) => squid.auth.as_ref(),
        Policy::Builtin(_) => None,
    }
}

/// Applies the policy in force to one request.
pub(crate) struct Judge<'a> {
    policy: &'a Policy,
    client: IpAddr,
    local: Option<SocketAddr>,
    method: &'a str,
    host: String,
    port: u16,
    /// The user `Proxy-Authorization` authenticated, if any.
    pub(crate) user: Option<String>,
}

impl<'a> Judge<'a> {
    pub(super) async fn new(
        settings: &'a Settings,
        authenticator: &Authenticator,
        record: &AccessRecord,
        head: &'a RequestHead,
        target: &Target,
    ) -> Result<Self, Refusal> {
        Self::for_request(
            settings,
            authenticator,
            (record.client.ip(), record.local),
            &head.method,
            target,
            head.proxy_authorization.as_deref(),
        )
        .await
    }

    /// The judge of a request for `method` to `target` from `client` (its
    /// address and the proxy address it reached), with its
    /// `Proxy-Authorization` value; 503 when the credentials had to be
    /// verified and every verifier is busy with a full queue.
    pub(crate) async fn for_request(
        settings: &'a Settings,
        authenticator: &Authenticator,
        (client, local): (IpAddr, Option<SocketAddr>),
        method: &'a str,
        target: &Target,
        proxy_authorization: Option<&str>,
    ) -> Result<Self, Refusal> {
        let host = match &target.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        };
        let mut judge = Self {
            policy: &settings.policy,
            client,
            local,
            method,
            host,
            port: target.port,
            user: None,
        };
        if let (Policy::Squid(squid), Some(credentials)) = (&settings.policy, proxy_authorization) {
            if let Some(auth) = squid.auth.as_ref().filter(|_| judge.wants_user(squid)) {
                judge.user = authenticator
                    .check(auth, credentials)
                    .await
                    .map_err(|err| Refusal::new(503, err.to_string()))?;
            }
        }
        Ok(judge)
    }

    /// Whether the rules may look at the user: Squid checks credentials only
    /// when a `proxy_auth` ACL is reached. When no `dst` ACL or TLS name
    /// policy can make a later decision take another path, a decision
    /// without a user that does not ask for one stands (a request another
    /// rule allows or denies first costs no hashing).
    pub(super) fn wants_user(&self, squid: &SquidConfig) -> bool {
        squid.uses_authentication()
            && (squid.needs_destination()
                || squid.peeks()
                || squid.decide(&self.facts(None, 0)) == Decision::AuthRequired)
    }

    /// Whether a `dst`-like ACL makes the answer depend on the address.
    pub(crate) fn needs_destination(&self) -> bool {
        matches!(self.policy, Policy::Squid(squid) if squid.needs_destination())
    }

    /// What the squid.conf rules look at, at SslBump `step` (0 for
    /// `http_access`).
    pub(crate) fn facts(&self, dst: Option<IpAddr>, step: u8) -> RequestFacts<'_> {
        RequestFacts {
            client: self.client,
            local_ip: self.local.map(|l| l.ip()),
            local_port: self.local.map_or(0, |l| l.port()),
            method: self.method,
            host: &self.host,
            port: self.port,
            dst,
            user: self.user.as_deref(),
            now: LocalTime::now(),
            step,
            sni: None,
        }
    }

    /// The squid.conf in force if it has a TLS name policy.
    pub(super) fn tls_policy(&self) -> Option<&SquidConfig> {
        match self.policy {
            Policy::Squid(squid) if squid.peeks() => Some(squid),
            _ => None,
        }
    }

    /// Decides with `dst` the address about to be connected to (`None` before
    /// resolution: `dst` ACLs then do not match, as in Squid).
    pub(crate) fn decide(&self, dst: Option<IpAddr>) -> Result<(), Refusal> {
        self.decide_as(dst, dst.is_some())
    }

    /// Decides with `dst` as the last word: a denial without a destination
    /// (a name that did not resolve) is final too.
    pub(crate) fn decide_final(&self, dst: Option<IpAddr>) -> Result<(), Refusal> {
        self.decide_as(dst, true)
    }

    pub(super) fn decide_as(&self, dst: Option<IpAddr>, last_word: bool) -> Result<(), Refusal> {
        match self.policy {
            Policy::Builtin(builtin) => if self.method == "CONNECT" {
                builtin.check(self.client, self.port)
            } else {
                builtin.check_plain(self.client, self.port)
            }
            .map_err(|denial| {
                let rule = match denial {
                    Denial::ClientNotLocal => "builtin:client_not_local",
                    Denial::PortNotAllowed(_) => "builtin:port_not_allowed",
                    Denial::UnsafePort(_) => "builtin:unsafe_port",
                };
                Refusal {
                    rule: Some(rule.into()),
                    ..Refusal::denied(403, denial.to_string())
                }
            }),
            Policy::Squid(squid) => {
                let decision = squid.decide(&self.facts(dst, 0));
                match decision {
                    Decision::Allow => Ok(()),
                    // Before resolution a denial that a destination could lift is
                    // not final; after it, it is.
                    Decision::Deny { ref file, line, .. }
                        if last_word || !squid.needs_destination() =>
                    {
                        let rule = if line == 0 {
                            "implicit".to_owned()
                        } else {
                            format!("{file}:{line}")
                        };
                        Err(Refusal {
                            rule: Some(rule),
                            ..Refusal::denied(403, decision.to_string())
                        })
                    }
                    Decision::Deny { .. } => Ok(()),
                    Decision::AuthRequired => {
                        let realm = squid.auth_realm().unwrap_or("spliced").replace('"', "'");
                        Err(Refusal {
                            headers: format!("Proxy-Authenticate: Basic realm=\"{realm}\"\r\n"),
                            ..Refusal::denied(407, "proxy authentication required")
                        })
                    }
                }
            }
        }
    }
}
