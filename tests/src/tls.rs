//! TLS origins for tests with real clients: a self-signed certificate made with
//! `openssl req`, and `openssl s_server -WWW` serving the files of a tempdir.

use std::{
    fs,
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{netns::Netns, wait_until};

/// How long an origin may take to start accepting.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound of one curl run (`--max-time`).
const CURL_MAX_SECS: &str = "60";

/// An `openssl s_server -WWW` serving the files of its own tempdir; killed when
/// dropped.
pub struct TlsOrigin {
    child: Child,
    /// Where it accepts TLS connections.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl TlsOrigin {
    /// Starts an origin on a free port of 127.0.0.1 with a certificate for
    /// `subject_alt_name` (e.g. `DNS:localhost`).
    pub fn start(subject_alt_name: &str) -> Self {
        let dir = make_certificate(subject_alt_name);
        // Another process may take the free port between our probe and s_server's
        // bind; then s_server exits and we try another port.
        let mut failures = Vec::new();
        for _ in 0..5 {
            let addr = TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("find a free port");
            let command = Command::new("openssl");
            match Self::spawn(command, dir.path(), addr, None) {
                Ok(child) => return Self { child, addr, dir },
                Err(why) => failures.push(why),
            }
        }
        panic!("openssl s_server did not start:\n{}", failures.join("\n"));
    }

    /// Starts an origin on `addr` inside `ns` with a certificate for
    /// `subject_alt_name` (e.g. `IP:10.77.2.2`).
    pub fn start_in(ns: &Netns, addr: SocketAddr, subject_alt_name: &str) -> Self {
        let dir = make_certificate(subject_alt_name);
        let child = Self::spawn(ns.command("openssl"), dir.path(), addr, Some(ns))
            .unwrap_or_else(|why| panic!("openssl s_server did not start in {}: {why}", ns.name));
        Self { child, addr, dir }
    }

    /// Runs `command` (an `openssl` invocation, possibly wrapped in `ip netns exec`)
    /// as the server and waits until it accepts on `addr`.
    fn spawn(
        mut command: Command,
        dir: &Path,
        addr: SocketAddr,
        ns: Option<&Netns>,
    ) -> Result<Child, String> {
        let stderr = fs::File::create(dir.join("s_server.err")).expect("create s_server.err");
        let mut child = command
            .args(["s_server", "-accept", &addr.to_string()])
            .args(["-cert", "cert.pem", "-key", "key.pem", "-WWW", "-quiet"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|err| format!("cannot run openssl: {err}"))?;
        let accepts = || match ns {
            Some(ns) => ns.enter(move || can_connect(addr)),
            None => can_connect(addr),
        };
        let mut exited = false;
        let started = wait_until(START_TIMEOUT, || {
            exited = child.try_wait().ok().flatten().is_some();
            exited || accepts()
        });
        if started && !exited {
            return Ok(child);
        }
        let _ = child.kill();
        let _ = child.wait();
        let log = fs::read_to_string(dir.join("s_server.err")).unwrap_or_default();
        Err(format!("s_server on {addr} (exited: {exited}): {log}"))
    }

    /// The directory the origin serves (`https://HOST:PORT/NAME` is file `NAME`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The certificate a client must trust.
    pub fn certificate(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Writes `len` random bytes to the served file `name` and returns them.
    pub fn serve_random_file(&self, name: &str, len: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(len);
        fs::File::open("/dev/urandom")
            .expect("open /dev/urandom")
            .take(len as u64)
            .read_to_end(&mut body)
            .expect("read /dev/urandom");
        assert_eq!(body.len(), len);
        fs::write(self.dir.path().join(name), &body).expect("write served file");
        body
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a TCP connection to `addr` opens within a second.
fn can_connect(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Makes a tempdir holding `cert.pem` and `key.pem`: a self-signed RSA certificate
/// whose CN is the value of `subject_alt_name` (`DNS:name` or `IP:address`).
fn make_certificate(subject_alt_name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, common_name) = subject_alt_name
        .split_once(':')
        .expect("subject_alt_name is TYPE:VALUE");
    let output = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={common_name}")])
        .args(["-addext", &format!("subjectAltName={subject_alt_name}")])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run openssl req");
    assert!(
        output.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

/// Runs the real curl, given as `command` (`Command::new("curl")` or a namespace's
/// `command("curl")`), to fetch `url` into `out` through the proxy named by
/// `https_proxy` (the value of `HTTPS_PROXY`), trusting only `ca`.
///
/// Every other proxy variable is removed so nothing bypasses or replaces the proxy.
pub fn curl(mut command: Command, https_proxy: &str, ca: &Path, url: &str, out: &Path) -> Output {
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        command.env_remove(var);
    }
    command
        .env("HTTPS_PROXY", https_proxy)
        .args(["-sS", "--fail", "--max-time", CURL_MAX_SECS, "--cacert"])
        .arg(ca)
        .arg("-o")
        .arg(out)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run curl")
}
