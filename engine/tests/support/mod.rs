//! Support for black-box tests of the `throng` binary: start it on a fresh loopback port with a chosen driver,
//! wait until `/health` answers, kill it when the test ends, and speak raw HTTP and WebSocket bytes to it.
//!
//! Every socket has read and write timeouts, so a server that stops answering fails the test instead of
//! hanging it.

#![allow(dead_code)] // each test binary uses a different subset

pub mod load;
pub mod redis;
pub mod v1;

/// Defines `<uring>` and `<epoll>` tests that run `body(Driver)` on the named driver (the test file imports
/// `Driver`).
macro_rules! on_both_drivers {
    ($($(#[$attr:meta])* $body:ident => $uring:ident, $epoll:ident;)*) => {$(
        #[test]
        $(#[$attr])*
        fn $uring() {
            $body(Driver::Uring)
        }

        #[test]
        $(#[$attr])*
        fn $epoll() {
            $body(Driver::Epoll)
        }
    )*};
}

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use throng_protocol::frame::{encode_client_frame, parse_header, OpCode};

/// How long any single socket read or write may block before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server may take to start answering `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The RFC 6455 sample key and its accept value.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// The mask key every test frame uses (any non-zero key would do).
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The I/O driver a server is started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Uring,
    Epoll,
}

impl Driver {
    /// The `--driver` value.
    pub fn flag(self) -> &'static str {
        match self {
            Driver::Uring => "uring",
            Driver::Epoll => "epoll",
        }
    }

    /// The name `/stats` reports.
    pub fn stats_name(self) -> &'static str {
        match self {
            Driver::Uring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// A loopback port nobody in this process has been handed before (the kernel picks it; the registry only
/// guards against handing the same one to two tests that run at once).
fn fresh_port() -> u16 {
    static USED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding a probe port").port();
        let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Raises this process's open-file soft limit to the hard limit (for tests holding thousands of sockets).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit struct for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit struct; setrlimit only reads it.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Bytes this socket has not had acknowledged by the peer yet (`SIOCOUTQ`).
pub fn unsent_bytes(s: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: `s` is an open socket for the duration of the call; TIOCOUTQ (= SIOCOUTQ) writes one c_int
    // into `n`, which is valid and writable.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n as usize
}

/// The receive window the peer of `s` last advertised (`tcpi_snd_wnd` of `TCP_INFO`): how much this
/// socket may send before the peer reads.
pub fn peer_window(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is a plain C struct for which all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid and writable for the call, `len` holds `info`'s size, and `s` is an
    // open socket.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_snd_wnd
}

/// Sets the receive buffer of the server's end of `client` (a connection to `srv`) to `bytes`, past the
/// `rmem_max` cap (`SO_RCVBUFFORCE`), by taking a copy of the server's socket descriptor with
/// `pidfd_getfd`. Needs root (CAP_SYS_PTRACE and CAP_NET_ADMIN); the error says what failed otherwise. For
/// tests that need a frozen server to hold more than autotuning would let it.
pub fn force_server_rcvbuf(srv: &Server, client: &TcpStream, bytes: i32) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let err = |what: &str| std::io::Error::other(format!("{what}: {}", std::io::Error::last_os_error()));
    let local = client.local_addr()?;
    // The server's socket for this connection: local = the server's address, remote = the client's.
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => String::new(),
    };
    let (want_local, want_remote) = (hex(srv.addr), hex(local));
    let table = std::fs::read_to_string(format!("/proc/{}/net/tcp", srv.pid()))?;
    let inode = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1] == want_local && f[2] == want_remote)
        .map(|f| f[9].to_string())
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "the server's socket is not in /proc/PID/net/tcp"))?;
    let target = format!("socket:[{inode}]");
    let mut server_fd = None;
    for entry in std::fs::read_dir(format!("/proc/{}/fd", srv.pid()))?.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy() == target) {
            server_fd = entry.file_name().to_string_lossy().parse::<i32>().ok();
        }
    }
    let server_fd = server_fd.ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no descriptor for it"))?;
    // SAFETY: pidfd_open takes a pid and flags, no pointers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, srv.pid() as libc::pid_t, 0) } as i32;
    if pidfd < 0 {
        return Err(err("pidfd_open"));
    }
    // SAFETY: `pidfd` is a new descriptor this function owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes descriptors and flags, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), server_fd, 0) } as i32;
    if fd < 0 {
        return Err(err("pidfd_getfd"));
    }
    // SAFETY: `fd` is a new descriptor (a copy of the server's) this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `bytes` is a valid c_int for the call and its size is passed; `fd` is open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(err("setsockopt(SO_RCVBUFFORCE)"));
    }
    Ok(())
}

/// A running `throng` process. Killed with SIGKILL on drop unless it has already exited.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub driver: Driver,
    log: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
    /// Written before each of the harness's own HTTP requests: a PROXY protocol v1 `UNKNOWN` header (what a
    /// load balancer's health check sends) when the server was started with `--proxy-protocol`.
    http_prefix: &'static [u8],
}

impl Server {
    /// Starts `throng --listen 127.0.0.1:<fresh port> --driver <driver> [--shards 1] <args>` and waits until
    /// `/health` answers `ok` and `/stats` names the requested driver. `--shards` defaults to 1 to keep the
    /// suite lean on a small machine.
    pub fn start(driver: Driver, args: &[&str]) -> Server {
        Self::start_with_nofile(driver, args, None)
    }

    /// [`Server::start`] with the server's open-file limit (soft and hard) set to `nofile` (through
    /// util-linux `prlimit`), to run it out of descriptors.
    pub fn start_with_nofile(driver: Driver, args: &[&str], nofile: Option<u32>) -> Server {
        Self::launch(driver, args, nofile, false, "info")
    }

    /// [`Server::start`] with `THRONG_LOG` set to `filter` (e.g. `debug`), for tests that read the log.
    pub fn start_with_log(driver: Driver, args: &[&str], filter: &str) -> Server {
        Self::launch(driver, args, None, false, filter)
    }

    /// [`Server::start`] listening on every address (`0.0.0.0`), reached by the tests over loopback.
    pub fn start_on_any_address(driver: Driver, args: &[&str]) -> Server {
        Self::launch(driver, args, None, true, "info")
    }

    fn launch(driver: Driver, args: &[&str], nofile: Option<u32>, any_address: bool, log_filter: &str) -> Server {
        for attempt in 1.. {
            let addr = SocketAddr::from(([127, 0, 0, 1], fresh_port()));
            let listen = if any_address { SocketAddr::from(([0, 0, 0, 0], addr.port())) } else { addr };
            let mut cmd = match nofile {
                None => Command::new(env!("CARGO_BIN_EXE_throng")),
                Some(n) => {
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--nofile={n}:{n}")).arg(env!("CARGO_BIN_EXE_throng"));
                    c
                }
            };
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("THRONG_") {
                    cmd.env_remove(k);
                }
            }
            cmd.args(["--listen", &listen.to_string(), "--driver", driver.flag()]);
            if !args.contains(&"--shards") {
                cmd.args(["--shards", "1"]);
            }
            cmd.args(args)
                .env("THRONG_LOG", log_filter)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawning the throng binary");
            let log = Arc::new(Mutex::new(String::new()));
            capture_output(&mut child, &log);
            let http_prefix: &[u8] = if args.contains(&"--proxy-protocol") { b"PROXY UNKNOWN\r\n" } else { b"" };
            let mut server = Server { child, addr, driver, log, exited: None, http_prefix };
            match server.wait_healthy() {
                Ok(()) => return server,
                // Another socket took the port between our probe and the server's bind: try another one.
                Err(log) if attempt < 5 && log.contains("binding") => continue,
                Err(log) => panic!("throng did not start ({driver:?}, {args:?}):\n{log}"),
            }
        }
        unreachable!()
    }

    /// Polls `/health` until it answers; Err(log) if the process exits or the deadline passes.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("no /health answer within {START_TIMEOUT:?}\n{}", self.log()));
            }
            if let Ok(resp) = try_http_get(self.addr, self.http_prefix, "/health", Duration::from_millis(500)) {
                if resp.status == 200 && health_ok(&resp.body) {
                    let stats = self.stats();
                    assert_eq!(stats["driver"], self.driver.stats_name(), "/stats names another driver: {stats}");
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the server has written to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends `sig` to the server process (e.g. SIGSTOP/SIGCONT to freeze it while a client queues input).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill takes no pointers; `pid` is our own child, not yet reaped (so not reused).
        unsafe { libc::kill(pid, sig) };
    }

    /// Sends SIGTERM (graceful drain).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the server has used so far, all threads, in nanoseconds (the first field of each thread's
    /// `/proc/<pid>/task/<tid>/schedstat`: time on a CPU, at scheduler resolution rather than clock ticks).
    pub fn cpu_ns(&self) -> u64 {
        let dir = format!("/proc/{}/task", self.pid());
        let mut total = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")).flatten() {
            let stat = std::fs::read_to_string(entry.path().join("schedstat")).unwrap_or_default();
            total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        total
    }

    /// The server's resident set size in bytes (`/proc/<pid>/statm`).
    pub fn rss_bytes(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid())).expect("statm");
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("statm rss");
        // SAFETY: sysconf takes no pointers.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited {
                return Some(status);
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A new TCP connection to the server, with timeouts set.
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A new connection upgraded on `/echo` (the 101 response checked and consumed).
    pub fn ws(&self) -> Client {
        let mut c = self.connect();
        c.upgrade("/echo");
        c
    }

    /// `GET path` on a new connection, read to the end.
    pub fn get(&self, path: &str) -> HttpResponse {
        try_http_get(self.addr, self.http_prefix, path, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    /// `/stats` parsed as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let resp = self.get("/stats");
        assert_eq!(resp.status, 200, "/stats: {}", resp.text());
        serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("/stats is not JSON ({e}): {}", resp.text()))
    }

    /// The value of a Prometheus metric from `/metrics`, summed over its series (shards).
    pub fn metric(&self, name: &str) -> u64 {
        let resp = self.get("/metrics");
        assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
        sum_metric(&resp.text(), name).unwrap_or_else(|| panic!("metric {name} not in /metrics:\n{}", resp.text()))
    }

    /// Polls `metric` until it reaches at least `min` (counters are updated by the shard that owns them).
    pub fn wait_metric_at_least(&self, name: &str, min: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(name);
            if v >= min || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- throng ({:?}, {}) stderr ---\n{}", self.driver, self.addr, self.log());
        }
    }
}

/// Whether a `/health` body says the server serves (`{"status":"ok",...}`, or `degraded`).
pub fn health_ok(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v["status"] == "ok" || v["status"] == "degraded")
}

/// Sums every sample of `name` (`name{labels} value` or `name value`) in a Prometheus text body.
pub fn sum_metric(text: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next()?.parse::<u64>().ok()?;
        *found.get_or_insert(0) += value;
    }
    found
}

/// A complete HTTP response (the server closes the connection after each one).
#[derive(Debug)]
pub struct HttpResponse {
    pub raw: Vec<u8>,
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn parse(raw: Vec<u8>) -> HttpResponse {
        let end =
            find(&raw, b"\r\n\r\n").unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(&raw)));
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status =
            head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line: {head}"));
        let body = raw[end + 4..].to_vec();
        HttpResponse { raw, status, head, body }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// A header's value (first occurrence, name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn try_http_get(addr: SocketAddr, prefix: &[u8], path: &str, timeout: Duration) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(prefix)?;
    // Read to the end: the server closes after this response (HTTP/1.1 connections are otherwise kept).
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    if find(&raw, b"\r\n\r\n").is_none() {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "incomplete response"));
    }
    Ok(HttpResponse::parse(raw))
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The upgrade request a browser would send for `path`, with `key`.
pub fn upgrade_request(path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// The exact 101 response for [`SAMPLE_KEY`].
pub fn expected_101() -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {SAMPLE_ACCEPT}\r\n\r\n"
    )
}

/// A masked client frame.
pub fn client_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    encode_client_frame(&mut v, fin, opcode, MASK, payload);
    v
}

/// A masked client close frame.
pub fn client_close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    client_frame(true, OpCode::Close, &payload)
}

/// A frame read from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub masked: bool,
    pub payload: Vec<u8>,
    /// The frame's bytes as received.
    pub raw: Vec<u8>,
}

impl Frame {
    /// The code of a close frame (None for an empty close or another opcode).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OpCode::Close && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// The reason of a close frame.
    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// A raw client connection with a read buffer.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Client::from_stream(stream)
    }

    /// Wraps an already connected stream, setting timeouts and TCP_NODELAY.
    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set_read_timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set_write_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        Client { stream, buf: Vec::new() }
    }

    pub fn set_read_timeout(&mut self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).expect("set_read_timeout");
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|e| panic!("write of {} bytes: {e}", bytes.len()));
    }

    /// Sends the upgrade request for `path` with [`SAMPLE_KEY`] and checks the exact 101 response.
    pub fn upgrade(&mut self, path: &str) {
        self.write(upgrade_request(path, SAMPLE_KEY).as_bytes());
        let head = self.read_head();
        assert_eq!(String::from_utf8_lossy(&head), expected_101(), "upgrade on {path} not accepted");
    }

    /// One read into the buffer; returns the bytes read (0 at EOF). Panics on a timeout or error.
    fn fill(&mut self, what: &str) -> usize {
        let mut tmp = [0u8; 64 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n
            }
            Err(e) => panic!("reading {what}: {e} (buffered: {:02x?})", &self.buf[..self.buf.len().min(64)]),
        }
    }

    /// Reads up to and including the blank line ending an HTTP head; later bytes stay buffered.
    pub fn read_head(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                return self.buf.drain(..i + 4).collect();
            }
            if self.fill("an HTTP head") == 0 {
                panic!("EOF before the end of the HTTP head: {:?}", String::from_utf8_lossy(&self.buf));
            }
        }
    }

    /// Reads exactly `n` bytes.
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill("bytes") == 0 {
                panic!("EOF after {} of {n} bytes: {:02x?}", self.buf.len(), &self.buf[..self.buf.len().min(64)]);
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Reads until the server closes the connection; returns everything (buffered bytes included).
    pub fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill("until EOF") > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// Reads one whole frame.
    pub fn read_frame(&mut self) -> Frame {
        loop {
            let h = parse_header(&self.buf).unwrap_or_else(|e| {
                panic!("server sent a bad frame header ({e:?}): {:02x?}", &self.buf[..self.buf.len().min(16)])
            });
            if let Some(h) = h {
                let total = h.frame_len() as usize;
                if self.buf.len() >= total {
                    let raw: Vec<u8> = self.buf.drain(..total).collect();
                    let payload = raw[usize::from(h.header_len)..].to_vec();
                    return Frame { fin: h.fin, opcode: h.opcode, masked: h.mask.is_some(), payload, raw };
                }
            }
            if self.fill("a frame") == 0 {
                panic!("EOF while waiting for a frame (buffered: {:02x?})", &self.buf[..self.buf.len().min(64)]);
            }
        }
    }

    /// Reads frames, answering and skipping server pings, until a non-ping frame arrives.
    pub fn read_frame_skip_pings(&mut self) -> Frame {
        loop {
            let f = self.read_frame();
            if f.opcode != OpCode::Ping {
                return f;
            }
            self.write(&client_frame(true, OpCode::Pong, &f.payload));
        }
    }

    /// Reads one frame and checks it is a close frame with `code`; returns it.
    pub fn expect_close(&mut self, code: u16) -> Frame {
        let f = self.read_frame_skip_pings();
        assert_eq!(f.opcode, OpCode::Close, "expected a close frame with {code}, got {f:?}");
        assert_eq!(f.close_code(), Some(code), "close frame {:02x?} (reason {:?})", f.raw, f.close_reason());
        assert!(!f.masked, "server frames must not be masked");
        assert!(std::str::from_utf8(&f.payload[2..]).is_ok(), "close reason is not UTF-8");
        f
    }

    /// Checks the server closed the TCP connection (read returns 0) with nothing else buffered.
    pub fn expect_eof(&mut self) {
        let rest = self.read_to_end();
        assert!(rest.is_empty(), "expected EOF, got {} more bytes: {:02x?}", rest.len(), &rest[..rest.len().min(64)]);
    }

    /// Sends a masked frame.
    pub fn send_frame(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) {
        self.write(&client_frame(fin, opcode, payload));
    }

    /// Sends a text message and checks the exact echo (`81 <len> <payload>`).
    pub fn echo_text(&mut self, text: &str) {
        self.send_frame(true, OpCode::Text, text.as_bytes());
        let f = self.read_frame_skip_pings();
        assert_eq!((f.fin, f.opcode, f.masked), (true, OpCode::Text, false), "echo of {text:?}: {f:?}");
        assert_eq!(f.payload, text.as_bytes());
    }

    /// Whether bytes are waiting (without blocking).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// A cgroup v1 `cpu` group capping the processes put into it at a share of one core: how a test saturates a
/// server on a machine with two cores and no second host. Removed (after its processes have left or died)
/// on drop.
pub struct CpuCap {
    dir: std::path::PathBuf,
}

impl CpuCap {
    /// Creates a group allowed `percent` of one core (`cpu.cfs_quota_us` over a 100 ms period). `None` when
    /// the `cpu` controller is not mounted at `/sys/fs/cgroup/cpu` or not writable (not root).
    pub fn new(percent: u32) -> Option<CpuCap> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = std::path::Path::new("/sys/fs/cgroup/cpu");
        if !root.join("cpu.cfs_quota_us").exists() {
            return None;
        }
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("throng-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let cap = CpuCap { dir };
        std::fs::write(cap.dir.join("cpu.cfs_period_us"), "100000").ok()?;
        std::fs::write(cap.dir.join("cpu.cfs_quota_us"), (percent * 1000).to_string()).ok()?;
        Some(cap)
    }

    /// Moves every thread of process `pid` into the group.
    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
    }

    /// How many 100 ms periods the group's processes were throttled in (proof the cap bit).
    pub fn throttled_periods(&self) -> u64 {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // The group can only be removed once empty: move anything left back to the root group.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write("/sys/fs/cgroup/cpu/cgroup.procs", pid);
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `name` on PATH or in the sbin directories (where Debian puts nginx, haproxy and redis-server); a failure
/// that says what to run when it is not installed (`packages`: the Debian packages tools/test installs).
pub fn find_binary(name: &str, packages: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/sbin", "/usr/local/sbin", "/sbin"].map(std::path::PathBuf::from);
    std::env::split_paths(&path).chain(sbin).map(|dir| dir.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} is not installed (not on PATH nor in /usr/sbin): run tools/test, which installs it \
             (apt-get install {packages})"
        )
    })
}

/// A directory of a test's own (configurations, certificates, sockets, logs), removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A fresh `throng-<prefix>-<pid>-<n>-<tag>` under the temporary directory.
    pub fn new(prefix: &str, tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("throng-{prefix}-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Collects whatever `child`'s piped stdout and stderr write into `log` (a thread per pipe, until EOF), so
/// a failing test can show the process's own words.
pub fn capture_output(child: &mut Child, log: &Arc<Mutex<String>>) {
    let pipes = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for mut out in pipes.into_iter().flatten() {
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap_or_else(|e| e.into_inner()).push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
}
