//! `auth_param basic children N [startup=N] [idle=N] [concurrency=N]
//! [queue-size=N] [on-persistent-overload=ERR]`: Squid's helper pool sizing,
//! which here sizes the pool of threads that verify password hashes (no
//! helper processes run).
//!
//! `N` bounds how many hashes are verified at once (never more than the
//! machine's CPUs: bcrypt is pure CPU), `queue-size` how many checks may wait
//! for one (Squid's default: twice `N`); a check beyond that is answered 503.
//! (Squid's `on-persistent-overload=ERR` fails the login instead: a 407, on
//! which clients ask for another password; 503 tells them to retry.) The only
//! `on-persistent-overload` accepted is `ERR`. `startup`, `idle` and
//! `concurrency` describe helper processes and have no effect.

use std::fmt;

/// Squid's default `children` for basic authentication.
pub const DEFAULT_CHILDREN: u32 = 20;

/// `auth_param basic children …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperChildren {
    /// The maximum number of helpers: hashes verified at once (capped by the
    /// CPU count when the pool is built).
    pub max: u32,
    /// `queue-size=`: checks that may wait for a verifier; `None` for
    /// Squid's default, twice `max`.
    pub queue_size: Option<u32>,
    /// `startup=`, `idle=`, `concurrency=` and `on-persistent-overload=` as
    /// written (no effect), kept for `spliced check`.
    pub ignored: Vec<String>,
}

impl Default for HelperChildren {
    fn default() -> Self {
        Self {
            max: DEFAULT_CHILDREN,
            queue_size: None,
            ignored: Vec::new(),
        }
    }
}

impl HelperChildren {
    /// Parses the words after `children`; the error names the bad word.
    pub fn parse(words: &[&str]) -> Result<Self, (String, String)> {
        let bad = |message: &str, word: &str| (message.to_owned(), word.to_owned());
        let (first, options) = words
            .split_first()
            .ok_or_else(|| bad("expected a number of helpers", ""))?;
        let max = first
            .parse::<u32>()
            .ok()
            .filter(|&max| max > 0)
            .ok_or_else(|| bad("expected a number of helpers above 0", first))?;
        let mut children = Self {
            max,
            ..Self::default()
        };
        for option in options {
            let (name, value) = option
                .split_once('=')
                .ok_or_else(|| bad("expected OPTION=VALUE", option))?;
            let number = || {
                value
                    .parse::<u32>()
                    .map_err(|_| bad("expected a number", option))
            };
            match name {
                "queue-size" => children.queue_size = Some(number()?),
                "startup" | "idle" | "concurrency" => {
                    number()?;
                    children.ignored.push((*option).to_owned());
                }
                "on-persistent-overload" if value == "ERR" => {
                    children.ignored.push((*option).to_owned());
                }
                "on-persistent-overload" => {
                    return Err(bad(
                        "only on-persistent-overload=ERR is supported: an overloaded \
                         check is answered 503, the proxy never exits for it",
                        option,
                    ))
                }
                _ => return Err(bad("unknown children option", option)),
            }
        }
        Ok(children)
    }

    /// Checks that may wait for a verifier.
    pub fn queue_limit(&self) -> usize {
        self.queue_size
            .map_or(2 * self.max as usize, |size| size as usize)
    }

    /// Hashes verified at once: `max`, at most the CPUs this process may use.
    pub fn workers(&self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        (self.max as usize).min(cpus).max(1)
    }
}

impl fmt::Display for HelperChildren {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.max)?;
        for option in &self.ignored {
            write!(f, " {option}")?;
        }
        if let Some(size) = self.queue_size {
            write!(f, " queue-size={size}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squid_forms() {
        let plain = HelperChildren::parse(&["5"]).unwrap();
        assert_eq!((plain.max, plain.queue_limit()), (5, 10));
        let full = HelperChildren::parse(&[
            "3",
            "startup=0",
            "idle=1",
            "concurrency=0",
            "queue-size=7",
            "on-persistent-overload=ERR",
        ])
        .unwrap();
        assert_eq!((full.max, full.queue_limit()), (3, 7));
        assert_eq!(
            full.to_string(),
            "3 startup=0 idle=1 concurrency=0 on-persistent-overload=ERR queue-size=7"
        );
        assert_eq!(
            HelperChildren::parse(&["1", "queue-size=0"])
                .unwrap()
                .queue_limit(),
            0
        );
        assert!(HelperChildren::parse(&["1"]).unwrap().workers() == 1);
        for (words, word) in [
            (&["0"][..], "0"),
            (&["x"], "x"),
            (&["2", "idle"], "idle"),
            (&["2", "idle=x"], "idle=x"),
            (&["2", "reservation-timeout=5"], "reservation-timeout=5"),
            (
                &["2", "on-persistent-overload=die"],
                "on-persistent-overload=die",
            ),
        ] {
            assert_eq!(
                HelperChildren::parse(words).unwrap_err().1,
                word,
                "{words:?}"
            );
        }
    }
}
