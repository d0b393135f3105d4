//! Throng behind real TLS-terminating proxies, on both drivers: nginx and HAProxy, each run from the
//! committed configuration in `tuning/` (only ports, paths, the upstream address and the connection limit
//! substituted, every substitution checked to apply), with a certificate made here by `openssl`, in front
//! of a real Throng. Each test shows, through the proxy:
//!
//! - TLS 1.2 and 1.3 are served and TLS 1.1 is not;
//! - a `wss://` client upgrades, and messages flow both ways: `/echo`, and `/ws` publish/subscribe;
//! - Throng sees each client's own address (the clients bind 127.0.0.23 and 127.0.0.24, the proxy talks to
//!   Throng from 127.0.0.1): through `X-Forwarded-For` from a trusted proxy (`--trusted-proxies`), or
//!   through the PROXY protocol (`--proxy-protocol`; nginx writes v1, HAProxy v2), read from Throng's debug
//!   log line `connected ... client_addr=...`;
//! - a SIGTERM drain takes the node out of the proxy's rotation before any connection closes: HAProxy's
//!   active check marks the server DOWN (its stats socket) and nginx answers `GET /health` with 503, while
//!   the open `wss://` connections still carry messages and a new upgrade gets 503; after the drain delay
//!   every connection gets 1001 through the proxy, and Throng exits 0.
//!
//! nginx and HAProxy are the Debian packages `nginx`, `libnginx-mod-stream` and `haproxy`, found on PATH or
//! in /usr/sbin; `tools/test` installs them. Without them these tests fail (they do not skip).

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use support::{capture_output, find_binary, Driver, Server, TempDir};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

on_both_drivers! {
    nginx_forwarded_for => nginx_forwarded_for_uring, nginx_forwarded_for_epoll;
    nginx_proxy_protocol => nginx_proxy_protocol_uring, nginx_proxy_protocol_epoll;
    haproxy_forwarded_for => haproxy_forwarded_for_uring, haproxy_forwarded_for_epoll;
    haproxy_proxy_protocol => haproxy_proxy_protocol_uring, haproxy_proxy_protocol_epoll;
}

fn nginx_forwarded_for(driver: Driver) {
    scenario(Kind::Nginx, Via::ForwardedFor, driver);
}

fn nginx_proxy_protocol(driver: Driver) {
    scenario(Kind::Nginx, Via::ProxyProtocol, driver);
}

fn haproxy_forwarded_for(driver: Driver) {
    scenario(Kind::Haproxy, Via::ForwardedFor, driver);
}

fn haproxy_proxy_protocol(driver: Driver) {
    scenario(Kind::Haproxy, Via::ProxyProtocol, driver);
}

/// Throng's drain delay in these tests: longer than HAProxy's worst detection time with the committed check
/// settings (inter 2 s + fastinter 0.5 s, plus timeout check 2 s for a node that hangs), with room for a
/// loaded machine.
const DRAIN_DELAY: Duration = Duration::from_secs(8);
/// Longest a socket read or write through the proxy may block (the 1001 comes after the whole delay).
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a polled request (health, an upgrade refusal) may block: well inside the polls' deadlines.
const POLL_IO_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a proxy may take to start and put Throng in rotation.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The clients' own addresses: not the proxy's (127.0.0.1), so Throng must have been told them.
const CLIENT_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 23);
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 24);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Nginx,
    Haproxy,
}

/// How the proxy tells Throng the client's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    ForwardedFor,
    ProxyProtocol,
}

fn scenario(kind: Kind, via: Via, driver: Driver) {
    let t_start = Instant::now();
    let dir = TempDir::new("proxies", &format!("{kind:?}-{via:?}-{driver:?}").to_lowercase());
    let tls = Tls::make(&dir.0);
    let delay = DRAIN_DELAY.as_secs().to_string();
    let mut args = vec!["--drain-delay", delay.as_str(), "--drain-timeout", "10"];
    match via {
        Via::ForwardedFor => args.extend(["--trusted-proxies", "127.0.0.1/32"]),
        Via::ProxyProtocol => args.push("--proxy-protocol"),
    }
    let mut srv = Server::start_with_log(driver, &args, "throng=debug");
    let proxy = Proxy::start(kind, via, &dir.0, srv.addr);
    proxy.wait_in_rotation(&tls);
    let ready = t_start.elapsed();

    // TLS 1.2 and 1.3, not 1.1.
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let r = https_get(proxy.port, "/health", &tls.config(version)).unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert!(r.status == 200 && support::health_ok(r.body.as_bytes()), "{version:?}: {} {}", r.status, r.body);
    }
    assert_refuses_tls11(proxy.port);

    // Both ways through the proxy: /echo, and /ws publish/subscribe.
    let mut echo = wss(proxy.port, CLIENT_A, "/echo", &tls);
    echo_roundtrip(&mut echo, "hello through the proxy");
    echo.send(Message::binary(vec![0u8, 1, 2, 255])).expect("send binary");
    assert_eq!(read_message(&mut echo), Message::binary(vec![0u8, 1, 2, 255]));
    let mut sub = V1::connect(proxy.port, CLIENT_B, "carol", &tls);
    let r = sub.call(json!({"type": "subscribe", "channel": "chat:proxied"}));
    assert_eq!(r["type"], "subscribed", "{r}");
    let mut publ = V1::connect(proxy.port, CLIENT_A, "dave", &tls);
    publish_and_deliver(&mut publ, &mut sub, 1);

    // Throng saw the clients' own addresses, never the proxy's.
    let log = wait_for_log(&srv, Duration::from_secs(10), |log| {
        connected_from(log, CLIENT_A) && connected_from(log, CLIENT_B)
    });
    assert!(
        !connected_from(&log, Ipv4Addr::LOCALHOST),
        "a connection was attributed to the proxy's address (127.0.0.1):\n{log}"
    );

    // The drain: out of rotation first, connections still working...
    let t0 = Instant::now();
    srv.sigterm();
    match kind {
        Kind::Nginx => {
            let r = poll(DRAIN_DELAY, || match https_get(proxy.port, "/health", &tls.default_config()) {
                Ok(r) if r.status == 503 => Ok(r),
                Ok(r) => Err(format!("/health through nginx: {} {}", r.status, r.body)),
                Err(e) => Err(e),
            });
            let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
            assert_eq!(body["status"], "draining", "{body}");
        }
        Kind::Haproxy => {
            let s = poll(DRAIN_DELAY, || match proxy.server_state() {
                Ok(s) if s.status == "DOWN" => Ok(s),
                Ok(s) => Err(format!("{s:?}")),
                Err(e) => Err(e),
            });
            // Down by its health check: layer 7, wrong status (Throng's 503).
            assert_eq!((s.check_status.as_str(), s.check_code.as_str()), ("L7STS", "503"), "{s:?}");
        }
    }
    let out_of_rotation = t0.elapsed();
    echo_roundtrip(&mut echo, "still open while out of rotation");
    publish_and_deliver(&mut publ, &mut sub, 2);
    let refused = raw_upgrade(proxy.port, "/echo", &tls).expect("an upgrade during the drain");
    assert_eq!(refused.status, 503, "{refused:?}");
    let reason: Value = serde_json::from_str(&refused.body).unwrap_or_else(|e| panic!("{e}: {refused:?}"));
    assert!(reason["reason"].as_str().is_some_and(|r| !r.is_empty()), "{reason}");
    let checked = t0.elapsed();
    assert!(
        checked < DRAIN_DELAY,
        "out of rotation after {out_of_rotation:?}, connections checked at {checked:?}: past the {DRAIN_DELAY:?} delay"
    );

    // ...then 1001 through the proxy after the delay, and exit 0.
    for (what, ws) in [("echo", &mut echo), ("subscriber", &mut sub.ws), ("publisher", &mut publ.ws)] {
        let f = expect_close(ws);
        assert_eq!(f.code, CloseCode::Away, "{what}: {f:?}");
        assert!(f.reason.contains("shutting down"), "{what}: not Throng's drain close: {f:?}");
    }
    let closed = t0.elapsed();
    assert!(closed >= DRAIN_DELAY - Duration::from_millis(200), "1001 after {closed:?}, before the delay");
    let status = srv
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running {:?} after SIGTERM", t0.elapsed()));
    assert!(status.success(), "exit status {status}");
    eprintln!(
        "{kind:?} {via:?} {driver:?}: in rotation after {ready:?}; after SIGTERM: out of rotation at \
         {out_of_rotation:?}, connections still working at {checked:?}, 1001 at {closed:?}, exit at {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------------------
// The proxies

/// A running nginx or HAProxy in its own process group, killed (group and all) on drop.
struct Proxy {
    kind: Kind,
    child: Child,
    port: u16,
    /// HAProxy's stats socket.
    stats_socket: PathBuf,
    /// Its stderr so far.
    log: Arc<Mutex<String>>,
}

impl Proxy {
    /// Renders the committed configuration for this test and starts the proxy on a free port. A port taken
    /// by someone else between the probe and the proxy's bind is retried with another.
    fn start(kind: Kind, via: Via, dir: &Path, throng: SocketAddr) -> Proxy {
        let binary = match kind {
            Kind::Nginx => find_binary("nginx", "nginx libnginx-mod-stream"),
            Kind::Haproxy => find_binary("haproxy", "haproxy"),
        };
        for attempt in 1.. {
            let port = free_port();
            let config = render(kind, via, dir, port, throng);
            let path = dir.join(match kind {
                Kind::Nginx => "nginx.conf",
                Kind::Haproxy => "haproxy.cfg",
            });
            std::fs::write(&path, &config).expect("writing the proxy configuration");
            let mut cmd = Command::new(&binary);
            match kind {
                // In the foreground, errors to stderr from the start (not /var/log/nginx).
                Kind::Nginx => cmd.args(["-e", "stderr", "-g", "daemon off;", "-c"]).arg(&path),
                // In the foreground (-db): one process.
                Kind::Haproxy => cmd.args(["-db", "-f"]).arg(&path),
            };
            match via {
                Via::ProxyProtocol => cmd.env("THRONG_PROXY_PROTOCOL", "1"),
                Via::ForwardedFor => cmd.env_remove("THRONG_PROXY_PROTOCOL"),
            };
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", binary.display()));
            let log = Arc::new(Mutex::new(String::new()));
            capture_output(&mut child, &log);
            let mut proxy = Proxy { kind, child, port, stats_socket: dir.join("admin.sock"), log };
            // Listening, or exited with the reason.
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Some(status) = proxy.child.try_wait().expect("try_wait") {
                    std::thread::sleep(Duration::from_millis(100)); // the rest of its stderr
                    let log = proxy.log();
                    if attempt < 5 && log.contains("in use") {
                        break;
                    }
                    let hint = if log.contains("unknown directive \"stream\"") {
                        "\nthe stream module is missing: apt-get install libnginx-mod-stream (tools/test installs it)"
                    } else {
                        ""
                    };
                    panic!("{kind:?} exited with {status} at start:\n{log}{hint}\n--- configuration ---\n{config}");
                }
                if TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1)).is_ok()
                {
                    // HAProxy listens with SO_REUSEPORT, as does every Throng: a server of another test that
                    // took the same port a moment earlier would share it, and get half of our connections.
                    let (ours, foreign) = listeners(port, proxy.child.id());
                    assert!(ours > 0, "{kind:?} answers on {port} but holds no listening socket there");
                    match foreign {
                        0 => return proxy,
                        n if attempt < 5 => {
                            eprintln!("port {port} is shared with {n} listener(s) of another process: trying another");
                            break;
                        }
                        n => panic!("port {port} is shared with {n} listener(s) of another process"),
                    }
                }
                if Instant::now() > deadline {
                    panic!("{kind:?} not listening on {port} after {READY_TIMEOUT:?}:\n{}", proxy.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        unreachable!()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the proxy routes to Throng: `/health` through it answers 200 and, for HAProxy, its
    /// active check has passed (server UP, last check L7OK), not merely the state a server starts in.
    fn wait_in_rotation(&self, tls: &Tls) {
        let config = tls.default_config();
        poll(READY_TIMEOUT, || {
            if self.kind == Kind::Haproxy {
                let s = self.server_state()?;
                if !(s.status == "UP" && s.check_status == "L7OK") {
                    return Err(format!("HAProxy's server: {s:?}"));
                }
            }
            match https_get(self.port, "/health", &config)? {
                r if r.status == 200 && support::health_ok(r.body.as_bytes()) => Ok(()),
                r => Err(format!("/health through the proxy: {} {}", r.status, r.body)),
            }
        });
    }

    /// HAProxy's view of the Throng server, from `show stat` on its stats socket.
    fn server_state(&self) -> Result<ServerState, String> {
        let mut s = UnixStream::connect(&self.stats_socket).map_err(|e| format!("stats socket: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        s.write_all(b"show stat\n").map_err(|e| format!("stats socket: {e}"))?;
        let mut csv = String::new();
        s.read_to_string(&mut csv).map_err(|e| format!("stats socket: {e}"))?;
        let header: Vec<&str> = csv
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .ok_or(format!("no header: {csv}"))?
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).ok_or(format!("no column {name}: {csv}"));
        let (status, check_status, check_code) = (col("status")?, col("check_status")?, col("check_code")?);
        let row: Vec<&str> = csv
            .lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[0] == "throng" && f[1] == "throng1")
            .ok_or(format!("no throng/throng1 row: {csv}"))?;
        let field = |i: usize| row.get(i).map_or(String::new(), |v| v.to_string());
        // HAProxy writes "* " before the last check's status while the next check is running (CI once read
        // "* L7STS"): the status is the same result.
        let last_check = field(check_status).trim_start_matches("* ").to_string();
        Ok(ServerState { status: field(status), check_status: last_check, check_code: field(check_code) })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let group = -(self.child.id() as libc::pid_t);
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill takes no pointers; the group is our child's, and the child is not reaped yet.
            unsafe { libc::kill(group, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Workers left behind (nginx's, if the master died first) go with the group.
        // SAFETY: as above; a group with no process left makes kill fail harmlessly (ESRCH).
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {:?} (port {}) output ---\n{}", self.kind, self.port, self.log());
        }
    }
}

#[derive(Debug)]
struct ServerState {
    status: String,
    check_status: String,
    check_code: String,
}

/// The committed configuration with this test's ports, paths and upstream. Every substitution must apply:
/// a change to the file that one no longer matches fails here rather than testing something else.
fn render(kind: Kind, via: Via, dir: &Path, port: u16, throng: SocketAddr) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let d = dir.display();
    let (file, subs): (&str, Vec<(&str, String)>) = match kind {
        Kind::Nginx => (
            match via {
                Via::ForwardedFor => "tuning/nginx/throng.conf",
                Via::ProxyProtocol => "tuning/nginx/throng-proxy-protocol.conf",
            },
            vec![
                ("pid /run/nginx.pid;", format!("pid {d}/nginx.pid;")),
                ("error_log /var/log/nginx/error.log warn;", "error_log stderr warn;".into()),
                ("/var/log/nginx/throng-access.log", format!("{d}/access.log")),
                ("listen 443 ssl;", format!("listen 127.0.0.1:{port} ssl;")),
                // No IPv6 in the test's network namespace is assumed.
                ("listen [::]:443 ssl;", String::new()),
                ("/etc/ssl/throng/fullchain.pem", format!("{d}/cert.pem")),
                ("/etc/ssl/throng/privkey.pem", format!("{d}/key.pem")),
                ("server 127.0.0.1:8080 ", format!("server {throng} ")),
            ],
        ),
        Kind::Haproxy => (
            "tuning/haproxy/haproxy.cfg",
            vec![
                ("log /dev/log local0 info", "log stderr format raw local0 info".into()),
                ("stats socket /run/haproxy/admin.sock", format!("stats socket {d}/admin.sock")),
                (
                    "bind :443 ssl crt /etc/haproxy/certs/throng.pem",
                    format!("bind 127.0.0.1:{port} ssl crt {d}/combined.pem"),
                ),
                ("server throng1 127.0.0.1:8080", format!("server throng1 {throng}")),
                // This machine's hard open-file limit (20,000) is below the 2 x 100,000 descriptors HAProxy
                // would raise its limit to, and it refuses to start when it cannot.
                ("maxconn 100000", "maxconn 4000".into()),
            ],
        ),
    };
    let mut text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    for (from, to) in subs {
        assert!(text.contains(from), "{file} no longer contains {from:?}: update engine/tests/proxies.rs");
        text = text.replace(from, &to);
    }
    text
}

/// Listening sockets on 127.0.0.1:`port` (or the wildcard address): how many belong to a process of the
/// process group `group`, and how many do not.
fn listeners(port: u16, group: u32) -> (usize, usize) {
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let ours_addr = [format!("0100007F:{port:04X}"), format!("00000000:{port:04X}")];
    let listening: Vec<String> = tcp
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && ours_addr.iter().any(|a| a == f[1]) && f[3] == "0A")
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    // The sockets the group's processes hold.
    let mut held = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: state, ppid, pgrp.
        let pgrp = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok());
        if pgrp != Some(group) {
            continue;
        }
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                held.insert(link.to_string_lossy().into_owned());
            }
        }
    }
    let ours = listening.iter().filter(|s| held.contains(*s)).count();
    (ours, listening.len() - ours)
}

/// A loopback port free now (the proxy binds it a moment later; [`Proxy::start`] retries on a clash).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding a probe port").port()
}

/// Polls `check` every 50 ms until it returns `Ok`, failing with its last error after `timeout`.
fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("not reached within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// TLS clients

/// A self-signed certificate for `localhost` and 127.0.0.1 (ECDSA P-256, made with openssl), and the client
/// side that trusts exactly it.
struct Tls {
    cert: CertificateDer<'static>,
}

impl Tls {
    /// Writes `cert.pem`, `key.pem` and `combined.pem` (both, for HAProxy) into `dir`.
    fn make(dir: &Path) -> Tls {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("running openssl (tools/test installs it)");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ]);
        run(&["x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der"]);
        let mut combined = std::fs::read(dir.join("cert.pem")).expect("cert.pem");
        combined.extend(std::fs::read(dir.join("key.pem")).expect("key.pem"));
        std::fs::write(dir.join("combined.pem"), combined).expect("combined.pem");
        Tls { cert: CertificateDer::from(std::fs::read(dir.join("cert.der")).expect("cert.der")) }
    }

    /// A client configuration trusting only the test's certificate, speaking only `version`.
    fn config(&self, version: &'static rustls::SupportedProtocolVersion) -> Arc<rustls::ClientConfig> {
        self.config_with(&[version])
    }

    /// The same, speaking TLS 1.3 or 1.2.
    fn default_config(&self) -> Arc<rustls::ClientConfig> {
        self.config_with(&[&rustls::version::TLS13, &rustls::version::TLS12])
    }

    fn config_with(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).expect("the test certificate as a root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the proxy on `port` from `source` (a loopback address of the client's own), the
/// handshake done, with timeouts set.
fn tls_connect(
    port: u16,
    source: Ipv4Addr,
    config: &Arc<rustls::ClientConfig>,
    io_timeout: Duration,
) -> Result<TlsStream, String> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    sock.bind(&SocketAddr::from((source, 0)).into()).map_err(|e| format!("bind {source}: {e}"))?;
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    sock.connect_timeout(&to.into(), Duration::from_secs(5)).map_err(|e| format!("connect {to}: {e}"))?;
    let tcp = TcpStream::from(sock);
    tcp.set_read_timeout(Some(io_timeout)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(io_timeout)).map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(tls)
}

/// A plain HTTP response read through TLS.
#[derive(Debug)]
struct Response {
    status: u16,
    body: String,
}

/// Sends `request` over a new TLS connection from 127.0.0.1 and reads the response (head, then
/// `Content-Length` bytes of body).
fn https_request(port: u16, request: &str, config: &Arc<rustls::ClientConfig>) -> Result<Response, String> {
    let mut tls = tls_connect(port, Ipv4Addr::LOCALHOST, config, POLL_IO_TIMEOUT)?;
    tls.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = support::find(&raw, b"\r\n\r\n") {
            break i + 4;
        }
        match tls.read(&mut buf) {
            Ok(0) => return Err(format!("EOF before the end of the head: {:?}", String::from_utf8_lossy(&raw))),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or(format!("bad status line: {head}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while raw.len() < head_end + length {
        match tls.read(&mut buf) {
            Ok(0) => return Err(format!("EOF in the body: {:?}", String::from_utf8_lossy(&raw))),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let body = String::from_utf8_lossy(&raw[head_end..head_end + length]).into_owned();
    Ok(Response { status, body })
}

fn https_get(port: u16, path: &str, config: &Arc<rustls::ClientConfig>) -> Result<Response, String> {
    https_request(port, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"), config)
}

/// An upgrade request through the proxy, read as a plain response (for refusals).
fn raw_upgrade(port: u16, path: &str, tls: &Tls) -> Result<Response, String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        support::SAMPLE_KEY
    );
    https_request(port, &request, &tls.default_config())
}

/// TLS 1.1 is refused: `openssl s_client` offering only TLS 1.1 (its own security level lowered so that it
/// does offer it; against a server that allows 1.1 this handshake succeeds) gets the server's
/// `protocol_version` alert.
fn assert_refuses_tls11(port: u16) {
    let out = Command::new("timeout")
        .args(["30", "openssl", "s_client", "-connect", &format!("127.0.0.1:{port}"), "-tls1_1"])
        .args(["-cipher", "DEFAULT@SECLEVEL=0"])
        .stdin(Stdio::null())
        .output()
        .expect("running openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a TLS 1.1 handshake succeeded:\n{text}");
    assert!(text.contains("alert protocol version"), "TLS 1.1 not refused by version ({}):\n{text}", out.status);
}

type Wss = WebSocket<TlsStream>;

/// A `wss://` connection through the proxy from `source`, upgraded on `path`.
fn wss(port: u16, source: Ipv4Addr, path: &str, tls: &Tls) -> Wss {
    let stream =
        tls_connect(port, source, &tls.default_config(), IO_TIMEOUT).unwrap_or_else(|e| panic!("wss {path}: {e}"));
    let url = format!("wss://localhost:{port}{path}");
    let (ws, resp) = tungstenite::client(url.as_str(), stream).unwrap_or_else(|e| panic!("upgrade {url}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// The next data message (pings are answered by tungstenite and skipped).
fn read_message(ws: &mut Wss) -> Message {
    loop {
        match ws.read().unwrap_or_else(|e| panic!("reading through the proxy: {e}")) {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

fn echo_roundtrip(ws: &mut Wss, text: &str) {
    ws.send(Message::text(text)).unwrap_or_else(|e| panic!("send: {e}"));
    assert_eq!(read_message(ws), Message::text(text));
}

/// Reads until the server's close frame, answers it, and reads to the end of the connection.
fn expect_close(ws: &mut Wss) -> CloseFrame {
    let frame = match read_message(ws) {
        Message::Close(Some(f)) => f,
        m => panic!("expected a close frame, got {m:?}"),
    };
    // tungstenite queued the answering close; send it, then wait for the end.
    let _ = ws.flush();
    for _ in 0..100 {
        match ws.read() {
            Ok(_) => continue,
            // The end of the connection, however the proxy ends it (close_notify and FIN, FIN, reset).
            Err(
                tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed | tungstenite::Error::Io(_),
            ) => break,
            Err(e) => panic!("after the close frame: {e}"),
        }
    }
    frame
}

/// A v1 client through the proxy: commands with ids, replies matched by id.
struct V1 {
    ws: Wss,
    next_id: u64,
}

impl V1 {
    fn connect(port: u16, source: Ipv4Addr, user: &str, tls: &Tls) -> V1 {
        let mut ws = wss(port, source, &format!("/ws?user={user}"), tls);
        let w = next_json(&mut ws);
        assert_eq!((w["type"].as_str(), w["user"].as_str()), (Some("welcome"), Some(user)), "{w}");
        V1 { ws, next_id: 1 }
    }

    fn call(&mut self, mut cmd: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        self.ws.send(Message::text(cmd.to_string())).unwrap_or_else(|e| panic!("send: {e}"));
        loop {
            let v = next_json(&mut self.ws);
            if v["id"] == id {
                return v;
            }
        }
    }
}

fn next_json(ws: &mut Wss) -> Value {
    match read_message(ws) {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("{e}: {t}")),
        m => panic!("expected a text message, got {m:?}"),
    }
}

/// `publ` publishes `{"n":n}` on `chat:proxied`; `sub` receives it.
fn publish_and_deliver(publ: &mut V1, sub: &mut V1, n: u64) {
    let r = publ.call(json!({"type": "publish", "channel": "chat:proxied", "data": {"n": n}}));
    assert_eq!(r["type"], "published", "{r}");
    let m = next_json(&mut sub.ws);
    assert_eq!((m["type"].as_str(), m["channel"].as_str()), (Some("message"), Some("chat:proxied")), "{m}");
    assert_eq!(m["data"], json!({"n": n}), "{m}");
}

/// Whether Throng logged a `/ws` connection from `addr`.
fn connected_from(log: &str, addr: Ipv4Addr) -> bool {
    log.lines().any(|l| l.contains(" connected") && l.contains(&format!("client_addr={addr} ")))
}

/// Polls Throng's log until `want` holds; returns it.
fn wait_for_log(srv: &Server, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = srv.log();
        if want(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "Throng's log lacks the expected lines:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
