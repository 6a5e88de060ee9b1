//! Basic proxy authentication against the password file of Squid's
//! `basic_ncsa_auth` helper, read in-process: no helper program is run.
//!
//! The file is Apache's htpasswd format, `user:hash` per line (`#` comments and
//! blank lines skipped). Hashes: bcrypt (`$2y$`, `$2b$`, `$2a$`), Apache MD5
//! (`$apr1$`), MD5-crypt (`$1$`) and `{SHA}` (base64 SHA-1). Traditional DES
//! crypt(3) and SHA-crypt (`$5$`, `$6$`) hashes are errors naming the line. The
//! file is read once, when the configuration loads.
//!
//! A check is split in three so that the control plane can cache and pool it
//! (`crate::auth_check`): [`BasicAuth::credentials`] decodes the header,
//! [`BasicAuth::verifier`] finds the user's hash, [`Verifier::verify`] does
//! the (possibly expensive) hashing. MD5-crypt stays hand-written: no
//! maintained crate verifies `$apr1$` (pwhash does `$1$` only, htpasswd-verify
//! depends on the unmaintained rust-crypto and panics on a malformed bcrypt hash).

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use md5::{Digest as _, Md5};
use sha1::Sha1;
use subtle::ConstantTimeEq as _;

use sha2::Sha256;

use super::{auth_children::HelperChildren, reader::Loc, Diagnostic};

/// Squid's default `auth_param basic realm`.
pub(super) const DEFAULT_REALM: &str = "Squid proxy-caching web server";

/// Basic authentication: `auth_param basic …` with the users of the password
/// file.
#[derive(Clone)]
pub struct BasicAuth {
    /// The helper program as written (its file name is `basic_ncsa_auth`).
    pub program: PathBuf,
    /// The password file, relative names resolved against the configuration
    /// file's directory.
    pub password_file: PathBuf,
    /// `auth_param basic realm`, sent in `Proxy-Authenticate`.
    pub realm: String,
    /// `auth_param basic casesensitive` (default off: the user name a client
    /// sends is lower-cased before the lookup, as Squid does).
    pub case_sensitive: bool,
    /// `auth_param basic children`: how many hashes are verified at once and
    /// how many checks may wait (no helper processes run).
    pub children: Option<HelperChildren>,
    /// `auth_param basic credentialsttl`: how long verified credentials are
    /// trusted without hashing again (Squid's default: 2 hours).
    pub credentials_ttl: Option<Duration>,
    /// `auth_param basic utf8`; no effect (credentials must be UTF-8).
    pub utf8: Option<bool>,
    users: HashMap<String, Entry>,
    /// SHA-256 of the password file's text: a reload with another digest
    /// empties the credentials cache.
    file_digest: [u8; 32],
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("program", &self.program)
            .field("password_file", &self.password_file)
            .field("realm", &self.realm)
            .field("case_sensitive", &self.case_sensitive)
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Entry {
    hash: PasswordHash,
    /// The hash as written: a cached success is bound to it.
    text: Arc<str>,
    loc: Loc,
}

/// The user name and password of a `Basic` `Proxy-Authorization` value.
pub struct Credentials {
    /// The user name, lower-cased unless `casesensitive on`.
    pub user: String,
    /// The password, as sent.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What a password is checked against: the user's hash, or for a user the
/// file does not list, another user's hash whose answer is ignored (the
/// check then takes as long as a real one).
#[derive(Clone)]
pub struct Verifier {
    hash: Option<PasswordHash>,
    text: Option<Arc<str>>,
}

impl Verifier {
    /// The user's hash as written in the file; `None` for an unknown user.
    pub fn hash_text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// Whether `password` matches; always false for an unknown user. A
    /// bcrypt hash costs milliseconds of CPU: call it off the async executor.
    pub fn verify(&self, password: &[u8]) -> bool {
        let matched = self.hash.as_ref().is_some_and(|hash| hash.verify(password));
        matched && self.text.is_some()
    }
}

#[derive(Clone)]
enum PasswordHash {
    Bcrypt(String),
    Md5Crypt {
        magic: &'static str,
        salt: String,
        checksum: String,
    },
    Sha1([u8; 20]),
}

/// The alphabet of crypt(3) hashes.
const CRYPT64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

impl BasicAuth {
    /// Reads the password file for `auth_param basic program PROGRAM FILE`.
    pub(super) fn load(
        program: PathBuf,
        password_file: PathBuf,
        warnings: &mut Vec<Diagnostic>,
        loc: &Loc,
    ) -> Result<Self, Diagnostic> {
        let shown = password_file.display().to_string();
        let text = fs::read_to_string(&password_file)
            .map_err(|err| loc.diag(format!("cannot read the password file: {err}"), &shown))?;
        let users = parse_users(&text, Arc::from(shown), warnings)?;
        Ok(Self::with_users(program, password_file, users, &text))
    }

    /// Parses the text of a password file, as `auth_param basic program
    /// …/basic_ncsa_auth FILE` would read FILE; `file` names it in diagnostics
    /// and becomes [`BasicAuth::password_file`]. The other settings are Squid's
    /// defaults. Returns the warnings (users listed twice) beside the result.
    pub fn parse_htpasswd(text: &str, file: &str) -> Result<(Self, Vec<Diagnostic>), Diagnostic> {
        let mut warnings = Vec::new();
        let users = parse_users(text, Arc::from(file), &mut warnings)?;
        let auth = Self::with_users(
            PathBuf::from("basic_ncsa_auth"),
            PathBuf::from(file),
            users,
            text,
        );
        Ok((auth, warnings))
    }

    fn with_users(
        program: PathBuf,
        password_file: PathBuf,
        users: HashMap<String, Entry>,
        text: &str,
    ) -> Self {
        Self {
            program,
            password_file,
            realm: DEFAULT_REALM.to_owned(),
            case_sensitive: false,
            children: None,
            credentials_ttl: None,
            utf8: None,
            users,
            file_digest: Sha256::digest(text.as_bytes()).into(),
        }
    }

    /// SHA-256 of the password file's text.
    pub fn file_digest(&self) -> [u8; 32] {
        self.file_digest
    }

    /// The number of users in the password file.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Warnings about users that can never log in: with `casesensitive off`
    /// the name looked up is lower-cased, so upper-case entries never match.
    pub(super) fn case_warnings(&self) -> Vec<Diagnostic> {
        if self.case_sensitive {
            return Vec::new();
        }
        let mut entries: Vec<(&String, &Entry)> = self
            .users
            .iter()
            .filter(|(user, _)| user.chars().any(|c| c.is_ascii_uppercase()))
            .collect();
        entries.sort_by_key(|(_, entry)| entry.loc.line);
        entries
            .into_iter()
            .map(|(user, entry)| {
                entry.loc.diag(
                    "user name has upper-case letters but 'auth_param basic casesensitive' is off, \
                     so the lower-cased name clients' credentials are looked up by never matches it",
                    user.as_str(),
                )
            })
            .collect()
    }

    /// Checks a `Proxy-Authorization` value, `Basic BASE64(user:password)`;
    /// returns the user name (lower-cased unless `casesensitive on`) when the
    /// password matches.
    pub fn verify_basic(&self, header_value: &str) -> Option<String> {
        let Credentials { user, password } = self.credentials(header_value)?;
        self.verifier(&user)
            .verify(password.as_bytes())
            .then_some(user)
    }

    /// Decodes a `Proxy-Authorization` value, `Basic BASE64(user:password)`;
    /// `None` when it is not one.
    pub fn credentials(&self, header_value: &str) -> Option<Credentials> {
        let (scheme, credentials) = header_value.trim().split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(credentials.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        let user = if self.case_sensitive {
            user.to_owned()
        } else {
            user.to_ascii_lowercase()
        };
        Some(Credentials {
            user,
            password: password.to_owned(),
        })
    }

    /// The hash `user`'s password is checked against.
    pub fn verifier(&self, user: &str) -> Verifier {
        match self.users.get(user) {
            Some(entry) => Verifier {
                hash: Some(entry.hash.clone()),
                text: Some(entry.text.clone()),
            },
            // Spend the time of a real check, so that timing does not tell
            // which user names exist.
            None => Verifier {
                hash: self.users.values().next().map(|any| any.hash.clone()),
                text: None,
            },
        }
    }
}

/// The users of a password file's text: `user:hash` per line, `#` comments and
/// blank lines skipped; a later entry for the same user wins, with a warning.
fn parse_users(
    text: &str,
    file: Arc<str>,
    warnings: &mut Vec<Diagnostic>,
) -> Result<HashMap<String, Entry>, Diagnostic> {
    let mut users = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let loc = Loc {
            file: file.clone(),
            line: index + 1,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, rest)) = line.split_once(':') else {
            return Err(loc.diag("expected USER:HASH", first_word(line)));
        };
        let hash = rest.split(':').next().unwrap_or_default().trim();
        if user.is_empty() {
            return Err(loc.diag("empty user name", line_prefix(line)));
        }
        let parsed = parse_hash(hash).map_err(|message| loc.diag(message, user))?;
        if users
            .insert(
                user.to_owned(),
                Entry {
                    hash: parsed,
                    text: Arc::from(hash),
                    loc: loc.clone(),
                },
            )
            .is_some()
        {
            warnings.push(loc.diag("user listed twice; this later entry wins", user));
        }
    }
    Ok(users)
}

fn first_word(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The start of a line, never a whole hash.
fn line_prefix(line: &str) -> String {
    line.chars().take(8).collect()
}

fn parse_hash(hash: &str) -> Result<PasswordHash, String> {
    if hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$") {
        return hash
            .parse::<bcrypt::HashParts>()
            .map(|_| PasswordHash::Bcrypt(hash.to_owned()))
            .map_err(|err| format!("bad bcrypt hash: {err}"));
    }
    for magic in ["$apr1$", "$1$"] {
        if let Some(rest) = hash.strip_prefix(magic) {
            let (salt, checksum) = rest
                .split_once('$')
                .ok_or_else(|| format!("bad {magic} hash: expected {magic}SALT$CHECKSUM"))?;
            let crypt64 = |text: &str| text.bytes().all(|b| CRYPT64.contains(&b));
            if salt.is_empty() || salt.len() > 8 || !crypt64(salt) {
                return Err(format!("bad {magic} hash: bad salt"));
            }
            if checksum.len() != 22 || !crypt64(checksum) {
                return Err(format!("bad {magic} hash: bad checksum"));
            }
            return Ok(PasswordHash::Md5Crypt {
                magic,
                salt: salt.to_owned(),
                checksum: checksum.to_owned(),
            });
        }
    }
    if let Some(encoded) = hash.strip_prefix("{SHA}") {
        let digest = STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| <[u8; 20]>::try_from(bytes).ok())
            .ok_or_else(|| "bad {SHA} hash: expected base64 of 20 bytes".to_owned())?;
        return Ok(PasswordHash::Sha1(digest));
    }
    if hash.starts_with("$5$") || hash.starts_with("$6$") {
        return Err(
            "SHA-crypt ($5$, $6$) hashes are not supported; use htpasswd -B (bcrypt)".into(),
        );
    }
    if hash.len() == 13 && hash.bytes().all(|b| CRYPT64.contains(&b)) {
        return Err(
            "traditional DES crypt(3) hashes are not supported; use htpasswd -B (bcrypt)".into(),
        );
    }
    Err("unrecognized password hash (supported: bcrypt, $apr1$, $1$, {SHA})".into())
}

impl PasswordHash {
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            Self::Md5Crypt {
                magic,
                salt,
                checksum,
            } => {
                let computed = md5_crypt(password, salt.as_bytes(), magic.as_bytes());
                computed.as_bytes().ct_eq(checksum.as_bytes()).into()
            }
            Self::Sha1(digest) => Sha1::digest(password).as_slice().ct_eq(digest).into(),
        }
    }
}

/// The MD5-crypt checksum (22 characters) of `password`, as in Poul-Henning
/// Kamp's FreeBSD crypt(3) (`$1$`) and Apache's variant (`$apr1$`), which only
/// differ in the magic string.
fn md5_crypt(password: &[u8], salt: &[u8], magic: &[u8]) -> String {
    let mut alternate = Md5::new();
    alternate.update(password);
    alternate.update(salt);
    alternate.update(password);
    let alternate = alternate.finalize();

    let mut context = Md5::new();
    context.update(password);
    context.update(magic);
    context.update(salt);
    let mut left = password.len();
    while left > 0 {
        let take = left.min(16);
        context.update(&alternate[..take]);
        left -= take;
    }
    let mut bits = password.len();
    while bits > 0 {
        if bits & 1 == 1 {
            context.update([0u8]);
        } else {
            context.update(&password[..1]);
        }
        bits >>= 1;
    }
    let mut digest = context.finalize();

    for round in 0..1000 {
        let mut context = Md5::new();
        if round & 1 == 1 {
            context.update(password);
        } else {
            context.update(digest.as_slice());
        }
        if round % 3 != 0 {
            context.update(salt);
        }
        if round % 7 != 0 {
            context.update(password);
        }
        if round & 1 == 1 {
            context.update(digest.as_slice());
        } else {
            context.update(password);
        }
        digest = context.finalize();
    }

    let d = digest.as_slice();
    let mut out = String::with_capacity(22);
    let mut push = |value: u32, chars: usize| {
        let mut value = value;
        for _ in 0..chars {
            out.push(char::from(CRYPT64[(value & 0x3f) as usize]));
            value >>= 6;
        }
    };
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        push(
            (u32::from(d[a]) << 16) | (u32::from(d[b]) << 8) | u32::from(d[c]),
            4,
        );
    }
    push(u32::from(d[11]), 2);
    out
}

/// Whether `program` is the NCSA helper (`basic_ncsa_auth`, or `ncsa_auth` from
/// Squid 3.1 and older) in any directory.
pub(super) fn is_ncsa_helper(program: &Path) -> bool {
    matches!(
        program.file_name().and_then(|name| name.to_str()),
        Some("basic_ncsa_auth" | "ncsa_auth")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_crypt_known_vectors() {
        // From `openssl passwd -apr1 -salt …` and `openssl passwd -1 -salt …`.
        let cases: &[(&str, &str, &str, &str)] = &[
            ("password", "lZL6V/ci", "$apr1$", "eIMz/iKDkbtys/uU7LEK00"),
            ("sécret pw", "rW.0ueXh", "$apr1$", "ZXDEm98nv8UvwuKefLBap0"),
            ("hunter2", "abcdefgh", "$1$", "vhxKZ/s1ygZHyCEDPyqtQ/"),
        ];
        for (password, salt, magic, checksum) in cases {
            assert_eq!(
                md5_crypt(password.as_bytes(), salt.as_bytes(), magic.as_bytes()),
                *checksum,
                "{password}"
            );
        }
    }

    #[test]
    fn hash_formats() {
        let ok = [
            "$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00",
            "$1$abcdefgh$vhxKZ/s1ygZHyCEDPyqtQ/",
            "{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=",
            "$2y$12$L6Bc/AlTQHyd9liGgGEZyOFLPHNgyxeEPfgYfBCVxJ7JIlwxyVU3u",
            "$2a$04$UuTkLRZZ6QofpDOlMz32MuuxEHA43WOemOYHPz6.SjsVsyO1tDU96",
        ];
        for hash in ok {
            assert!(parse_hash(hash).is_ok(), "{hash}");
        }
        let bad = [
            ("abJnggxhB/yWI", "DES"),
            ("$6$salt$abc", "SHA-crypt"),
            ("$apr1$toolongsalt$eIMz/iKDkbtys/uU7LEK00", "salt"),
            ("$apr1$lZL6V/ci$short", "checksum"),
            ("$apr1$nodollar", "SALT$CHECKSUM"),
            ("{SHA}bm90IDIwIGJ5dGVz", "20 bytes"),
            ("$2y$99$L6Bc/AlTQHyd9liGgGEZyO", "bcrypt"),
            ("plaintext", "unrecognized"),
            ("", "unrecognized"),
        ];
        for (hash, expected) in bad {
            let err = match parse_hash(hash) {
                Ok(_) => panic!("{hash} parsed"),
                Err(err) => err,
            };
            assert!(err.contains(expected), "{hash}: {err}");
        }
    }

    #[test]
    fn verification() {
        let sha = parse_hash("{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=").unwrap();
        assert!(sha.verify(b"hunter2") && !sha.verify(b"hunter3"));
        let apr1 = parse_hash("$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00").unwrap();
        assert!(apr1.verify(b"password") && !apr1.verify(b"Password"));
        let bcrypt =
            parse_hash("$2a$04$UuTkLRZZ6QofpDOlMz32MuuxEHA43WOemOYHPz6.SjsVsyO1tDU96").unwrap();
        assert!(bcrypt.verify(b"password") && !bcrypt.verify(b"passwort"));
        let generated = bcrypt::hash("s3cret", 4).unwrap();
        let generated = parse_hash(&generated).unwrap();
        assert!(generated.verify(b"s3cret") && !generated.verify(b""));
    }

    #[test]
    fn password_file_text() {
        let text = "# users\nbob:$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00\n\n carol:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=:x\nbob:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\n";
        let (auth, warnings) = BasicAuth::parse_htpasswd(text, "users.txt").unwrap();
        assert_eq!(auth.user_count(), 2);
        assert_eq!(auth.password_file, Path::new("users.txt"));
        assert_eq!(auth.realm, DEFAULT_REALM);
        assert!(is_ncsa_helper(&auth.program));
        assert_eq!(warnings.len(), 1);
        assert_eq!((warnings[0].line, warnings[0].text.as_str()), (5, "bob"));
        let basic = |credentials: &str| format!("Basic {}", STANDARD.encode(credentials));
        assert_eq!(
            auth.verify_basic(&basic("bob:hunter2")).as_deref(),
            Some("bob")
        );
        assert_eq!(
            auth.verify_basic(&basic("Carol:hunter2")).as_deref(),
            Some("carol")
        );
        let err = BasicAuth::parse_htpasswd("ok:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\nnocolon\n", "f")
            .unwrap_err();
        assert_eq!(err.to_string(), "f:2: expected USER:HASH: 'nocolon'");
    }

    #[test]
    fn helper_names() {
        assert!(is_ncsa_helper(Path::new("/usr/lib/squid/basic_ncsa_auth")));
        assert!(is_ncsa_helper(Path::new(
            "/usr/lib64/squid/basic_ncsa_auth"
        )));
        assert!(is_ncsa_helper(Path::new("/usr/lib/squid3/ncsa_auth")));
        assert!(!is_ncsa_helper(Path::new("/usr/lib/squid/basic_ldap_auth")));
    }
}
