//! `wss://`: the bench through a TLS terminator (a rustls server with a self-signed certificate made here
//! with rcgen) in front of the in-test WebSocket server. Echo and broadcast lose nothing over TLS 1.3 and
//! 1.2 and every cipher suite (messages larger than a record and than the read buffer included); the
//! negotiated version and suite are reported; sessions resume (TLS 1.3 tickets arrive after the handshake,
//! on the bench's own record layer); key updates from the server are followed; an untrusted certificate or
//! a wrong name fails fast with a clear message, and `--insecure-skip-verify` connects.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{Options, TestServer};
use rcgen::{CertifiedKey, KeyPair};
use rustls::crypto::ring::{cipher_suite, default_provider};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, SupportedCipherSuite, SupportedProtocolVersion};
use throng_bench::{run, Args, Plan, Report, WorkerCommand};

/// What the terminator does besides relaying.
#[derive(Clone, Copy, Debug, Default)]
struct Behaviour {
    /// Send a TLS 1.3 `KeyUpdate` (update requested) after every n-th chunk relayed to the client.
    key_update_every: u64,
}

/// A TLS terminator: accepts TLS on an ephemeral loopback port and relays the plaintext to `backend`, one
/// thread per direction per connection; stopped when dropped.
struct Terminator {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    key_updates: Arc<AtomicU64>,
}

impl Terminator {
    fn start(backend: SocketAddr, config: Arc<ServerConfig>, b: Behaviour) -> Terminator {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let key_updates = Arc::new(AtomicU64::new(0));
        let (s, k) = (Arc::clone(&stop), Arc::clone(&key_updates));
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (config, k) = (Arc::clone(&config), Arc::clone(&k));
                std::thread::spawn(move || terminate(stream, backend, config, b, k));
            }
        });
        Terminator { addr, stop, accept: Some(accept), key_updates }
    }

    fn url(&self) -> String {
        format!("wss://{}", self.addr)
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn terminate(client: TcpStream, backend: SocketAddr, config: Arc<ServerConfig>, b: Behaviour, kus: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let Ok(back) = TcpStream::connect(backend) else { return };
    let _ = back.set_nodelay(true);
    let tls = Arc::new(Mutex::new(ServerConnection::new(config).unwrap()));
    // Backend to client: encrypt and send (under the lock, which the other direction only holds briefly).
    let down = {
        let (tls, mut back, mut client) = (Arc::clone(&tls), back.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut chunks = 0u64;
            loop {
                let n = match back.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut g = tls.lock().unwrap();
                if g.writer().write_all(&buf[..n]).is_err() {
                    break;
                }
                chunks += 1;
                if b.key_update_every > 0
                    && chunks.is_multiple_of(b.key_update_every)
                    && g.refresh_traffic_keys().is_ok()
                {
                    kus.fetch_add(1, Ordering::SeqCst);
                }
                while g.wants_write() {
                    if g.write_tls(&mut client).is_err() {
                        return;
                    }
                }
            }
            let mut g = tls.lock().unwrap();
            g.send_close_notify();
            while g.wants_write() {
                if g.write_tls(&mut client).is_err() {
                    break;
                }
            }
            let _ = client.shutdown(Shutdown::Write);
        })
    };
    // Client to backend: decrypt (under the lock), then send without it.
    let (mut client_r, mut client_w, mut back_w) = (client.try_clone().unwrap(), client, back);
    let mut buf = vec![0u8; 64 * 1024];
    let mut plain = vec![0u8; 64 * 1024];
    'conn: loop {
        let n = match client_r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut out = Vec::new();
        let mut eof = false;
        {
            let mut g = tls.lock().unwrap();
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                if g.read_tls(&mut rd).is_err() {
                    break 'conn;
                }
                let state = g.process_new_packets();
                while g.wants_write() {
                    if g.write_tls(&mut client_w).is_err() {
                        break 'conn;
                    }
                }
                if state.is_err() {
                    break 'conn;
                }
                loop {
                    match g.reader().read(&mut plain) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(k) => out.extend_from_slice(&plain[..k]),
                        Err(_) => break,
                    }
                }
            }
        }
        if !out.is_empty() && back_w.write_all(&out).is_err() {
            break;
        }
        if eof {
            break;
        }
    }
    let _ = back_w.shutdown(Shutdown::Write);
    let _ = down.join();
    let _ = client_r.shutdown(Shutdown::Both);
}

/// A self-signed certificate (ECDSA P-256) for `names`, and its PEM in a temporary file.
struct Cert {
    key: CertifiedKey<KeyPair>,
    pem: PathBuf,
}

impl Cert {
    fn new(names: &[&str]) -> Cert {
        let key = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let pem = std::env::temp_dir().join(format!("throng-bench-tls-{}-{nanos}.pem", std::process::id()));
        std::fs::write(&pem, key.cert.pem()).unwrap();
        Cert { key, pem }
    }

    fn ca(&self) -> String {
        self.pem.to_str().unwrap().to_string()
    }

    /// A server configuration with this certificate: `suites` (default: all of ring's), `versions`.
    fn server(
        &self,
        suites: Option<Vec<SupportedCipherSuite>>,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ServerConfig> {
        let mut provider = default_provider();
        if let Some(s) = suites {
            provider.cipher_suites = s;
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.signing_key.serialize_der()));
        let config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.key.cert.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }

    fn default_server(&self) -> Arc<ServerConfig> {
        self.server(None, &[&rustls::version::TLS13, &rustls::version::TLS12])
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pem);
    }
}

fn bench(args: &[&str]) -> Report {
    bench_with(args, &WorkerCommand::default())
}

fn bench_with(args: &[&str], worker: &WorkerCommand) -> Report {
    let mut v = vec!["throng-bench"];
    v.extend_from_slice(args);
    let plan = Plan::from_args(&Args::parse_from(v)).expect("valid arguments");
    run(&plan, worker).expect("run completes")
}

fn assert_lossless(r: &Report) {
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent > 0, "{r:#?}");
    assert_eq!((m.lost, m.skipped, m.duplicates, m.gaps, m.unparsed), (0, 0, 0, 0, 0), "{r:#?}");
    assert_eq!(m.delivered, m.expected, "{r:#?}");
    assert_eq!(r.connect.failed, 0, "{r:#?}");
}

#[test]
fn echo_and_broadcast_over_wss_lose_nothing() {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let server = TestServer::start(Options::default());
    let tls = Terminator::start(server.addr, cert.default_server(), Behaviour::default());
    let (url, ca) = (tls.url(), cert.ca());
    let common = ["--url", &url, "--ca-file", &ca, "--duration", "1", "--grace", "1"];

    let mut args = vec!["echo", "--connections", "10", "--inflight", "2"];
    args.extend_from_slice(&common);
    let r = bench(&args);
    assert_lossless(&r);
    assert!(r.messages.as_ref().unwrap().sent > 100, "{r:#?}");
    assert_eq!(r.url, url);
    let t = r.tls.as_ref().unwrap();
    assert_eq!(t.version.as_deref(), Some("TLSv1.3"), "{t:#?}");
    assert!(t.cipher_suite.as_deref().unwrap().starts_with("TLS13_"), "{t:#?}");
    assert_eq!((t.verify, t.server_name.as_str(), t.handshakes), ("ca-file", "127.0.0.1", 10), "{t:#?}");
    assert_eq!(t.handshake_us.count, 10);
    assert!(t.handshake_cpu_us.count == 10 && t.handshake_cpu_us.max > 0.0, "{t:#?}");
    assert!(t.first_error.is_none());
    assert!(r.connect.client_cpu_s > 0.0, "{:#?}", r.connect);
    assert!(r.human().contains("TLSv1.3"), "{}", r.human());

    let mut args = vec!["broadcast", "--target", "raw", "--connections", "20", "--publishers", "2", "--rate", "200"];
    args.extend_from_slice(&common);
    let r = bench(&args);
    assert_lossless(&r);
    assert_eq!(r.messages.as_ref().unwrap().expected, r.messages.as_ref().unwrap().sent * 20);

    let mut args = vec!["broadcast", "--connections", "10", "--publishers", "2", "--rate", "100"];
    args.extend_from_slice(&common);
    let r = bench(&args);
    assert_lossless(&r);
    assert_eq!(r.connect.ready, 12, "{r:#?}");
}

#[test]
fn every_suite_and_version_with_messages_larger_than_a_record() {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let server = TestServer::start(Options::default());
    let cases: [(SupportedCipherSuite, &'static SupportedProtocolVersion, &str); 6] = [
        (cipher_suite::TLS13_AES_128_GCM_SHA256, &rustls::version::TLS13, "TLSv1.3"),
        (cipher_suite::TLS13_AES_256_GCM_SHA384, &rustls::version::TLS13, "TLSv1.3"),
        (cipher_suite::TLS13_CHACHA20_POLY1305_SHA256, &rustls::version::TLS13, "TLSv1.3"),
        (cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, &rustls::version::TLS12, "TLSv1.2"),
        (cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, &rustls::version::TLS12, "TLSv1.2"),
        (cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, &rustls::version::TLS12, "TLSv1.2"),
    ];
    let ca = cert.ca();
    for (suite, version, name) in cases {
        let tls = Terminator::start(server.addr, cert.server(Some(vec![suite]), &[version]), Behaviour::default());
        let url = tls.url();
        // 70 000 bytes: frames over several records, and larger than the bench's read head room.
        for size in ["100", "70000"] {
            let args = ["echo", "--url", &url, "--ca-file", &ca, "--connections", "3", "--inflight", "2"];
            let mut args = args.to_vec();
            args.extend_from_slice(&["--size", size, "--duration", "0.3", "--grace", "1"]);
            let r = bench(&args);
            assert_lossless(&r);
            let t = r.tls.as_ref().unwrap();
            assert_eq!(t.version.as_deref(), Some(name), "{t:#?}");
            assert_eq!(t.cipher_suite.as_deref(), Some(format!("{:?}", suite.suite()).as_str()), "{t:#?}");
        }
    }
    // The client can insist on TLS 1.2 with a server that offers both.
    let tls = Terminator::start(server.addr, cert.default_server(), Behaviour::default());
    let url = tls.url();
    let args = ["echo", "--url", &url, "--ca-file", &ca, "--tls-version", "1.2", "--connections", "2"];
    let mut args = args.to_vec();
    args.extend_from_slice(&["--duration", "0.3", "--grace", "1"]);
    let r = bench(&args);
    assert_lossless(&r);
    assert_eq!(r.tls.as_ref().unwrap().version.as_deref(), Some("TLSv1.2"));
}

#[test]
fn sessions_resume_unless_told_not_to() {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let server = TestServer::start(Options::default());
    let tls = Terminator::start(server.addr, cert.default_server(), Behaviour::default());
    let (url, ca) = (tls.url(), cert.ca());
    // One handshake at a time, 10 ms apart: the first connection's tickets (TLS 1.3: sent after the
    // handshake, read by the bench's record layer) are there for the next ones.
    let base = ["connect", "--url", &url, "--ca-file", &ca, "--connections", "12", "--ramp-rate", "100"];
    for (extra, version) in [(&[][..], "TLSv1.3"), (&["--tls-version", "1.2"][..], "TLSv1.2")] {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--max-pending", "1", "--hold", "0.2"]);
        args.extend_from_slice(extra);
        let r = bench(&args);
        let t = r.tls.as_ref().unwrap();
        assert_eq!((r.connect.ready, t.handshakes), (12, 12), "{r:#?}");
        assert_eq!(t.version.as_deref(), Some(version));
        assert!(t.resumed >= 8, "{version}: {t:#?}");
        assert!(t.resumption);
        let mut args = base.to_vec();
        args.extend_from_slice(&["--max-pending", "1", "--hold", "0.2", "--no-tls-resumption"]);
        args.extend_from_slice(extra);
        let r = bench(&args);
        let t = r.tls.as_ref().unwrap();
        assert_eq!((r.connect.ready, t.resumed, t.resumption), (12, 0, false), "{t:#?}");
    }
}

#[test]
fn server_key_updates_are_followed() {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let server = TestServer::start(Options::default());
    let tls = Terminator::start(server.addr, cert.default_server(), Behaviour { key_update_every: 25 });
    let (url, ca) = (tls.url(), cert.ca());
    let args = ["echo", "--url", &url, "--ca-file", &ca, "--connections", "2", "--duration", "1", "--grace", "1"];
    let r = bench(&args);
    assert_lossless(&r);
    assert!(r.messages.as_ref().unwrap().sent > 100, "{r:#?}");
    // The server renewed its keys several times on each connection, and the bench answered in kind.
    assert!(tls.key_updates.load(Ordering::SeqCst) >= 4, "{}", tls.key_updates.load(Ordering::SeqCst));
}

#[test]
fn untrusted_certificate_or_wrong_name_fails_fast_and_clearly() {
    let cert = Cert::new(&["localhost"]);
    let server = TestServer::start(Options::default());
    let tls = Terminator::start(server.addr, cert.default_server(), Behaviour::default());
    let (url, ca) = (tls.url(), cert.ca());
    // No --ca-file: the system store does not know a self-signed certificate.
    let t0 = Instant::now();
    let r = bench(&["connect", "--url", &url, "--connections", "3", "--hold", "0.2"]);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!((r.connect.ready, r.connect.failed), (0, 3), "{r:#?}");
    assert_eq!(r.connect.errors.get("tls_unknown_issuer"), Some(&3), "{r:#?}");
    let t = r.tls.as_ref().unwrap();
    assert_eq!(t.verify, "system");
    assert!(t.first_error.as_deref().unwrap().contains("UnknownIssuer"), "{t:#?}");
    assert!(r.warnings[0].contains("UnknownIssuer") && r.warnings[0].contains("--ca-file"), "{:?}", r.warnings);
    // The binary says so and exits with an error.
    let out = Command::new(env!("CARGO_BIN_EXE_throng-bench"))
        .args(["connect", "--url", &url, "--connections", "2", "--hold", "0.2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("TLS handshake") && stderr.contains("UnknownIssuer"), "{stderr}");

    // Trusted, but the certificate is for localhost, not 127.0.0.1; --sni names it.
    let r = bench(&["connect", "--url", &url, "--ca-file", &ca, "--connections", "2", "--hold", "0.2"]);
    assert_eq!(r.connect.errors.get("tls_bad_certificate_name"), Some(&2), "{r:#?}");
    let sni = ["connect", "--url", &url, "--ca-file", &ca, "--sni", "localhost", "--connections", "2", "--hold", "0.2"];
    let r = bench(&sni);
    assert_eq!((r.connect.ready, r.tls.as_ref().unwrap().server_name.as_str()), (2, "localhost"), "{r:#?}");
    // A localhost URL needs nothing more.
    let local = format!("wss://localhost:{}", tls.addr.port());
    let r = bench(&["connect", "--url", &local, "--ca-file", &ca, "--connections", "2", "--hold", "0.2"]);
    assert_eq!(r.connect.ready, 2, "{r:#?}");
}

#[test]
fn a_server_that_never_answers_the_hello_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("wss://{}", listener.local_addr().unwrap());
    let hold = std::thread::spawn(move || {
        // Accept and keep the sockets, say nothing.
        let mut held = Vec::new();
        for s in listener.incoming().take(2) {
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let t0 = Instant::now();
    let args = ["connect", "--url", &url, "--insecure-skip-verify", "--connections", "2", "--connect-timeout", "0.5"];
    let r = bench(&args);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!((r.connect.ready, r.connect.errors.get("timeout")), (0, Some(&2)), "{r:#?}");
    assert_eq!(r.tls.as_ref().unwrap().handshakes, 0);
    hold.join().unwrap();
}

#[test]
fn insecure_skip_verify_connects() {
    let cert = Cert::new(&["some.other.name"]);
    let server = TestServer::start(Options::default());
    let tls = Terminator::start(server.addr, cert.default_server(), Behaviour::default());
    let url = tls.url();
    let args = ["echo", "--url", &url, "--insecure-skip-verify", "--connections", "3", "--duration", "0.5"];
    let r = bench(&args);
    assert_lossless(&r);
    assert_eq!(r.tls.as_ref().unwrap().verify, "none");
}

#[test]
fn churn_and_worker_processes_over_wss() {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let server = TestServer::start(Options::default());
    let tls = Terminator::start(server.addr, cert.default_server(), Behaviour::default());
    let (url, ca) = (tls.url(), cert.ca());
    // Churn: connect, TLS, upgrade, subscribe, close (the server's close frame, then close_notify).
    let args = ["churn", "--url", &url, "--ca-file", &ca, "--connections", "4", "--churn-rate", "40"];
    let mut args = args.to_vec();
    args.extend_from_slice(&["--duration", "1", "--grace", "1"]);
    let r = bench(&args);
    let ch = r.churn.as_ref().unwrap();
    assert!(ch.completed >= 20 && ch.failed == 0, "{r:#?}");
    assert_lossless(&r);
    // The steady connections' handshakes, and one per churn connection that got that far.
    let t = r.tls.as_ref().unwrap();
    assert!(t.handshakes >= 4 + 1 + ch.completed && t.handshakes <= 4 + 1 + ch.opened, "{t:#?}");
    // Two worker processes: the TLS figures come back with their tallies.
    let args = ["echo", "--url", &url, "--ca-file", &ca, "--connections", "4", "--procs", "2", "--duration", "0.5"];
    let worker =
        WorkerCommand { exe: env!("CARGO_BIN_EXE_throng-bench").into(), args: args.iter().map(Into::into).collect() };
    let r = bench_with(&args, &worker);
    assert_lossless(&r);
    let t = r.tls.as_ref().unwrap();
    assert_eq!((t.handshakes, t.version.as_deref()), (4, Some("TLSv1.3")), "{t:#?}");
}
