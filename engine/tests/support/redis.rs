//! Real `redis-server` processes for tests: one standalone server ([`Redis`]) or a Redis Cluster of masters
//! ([`RedisCluster`]), each on free loopback ports, with no persistence, in a temporary directory of its
//! own, killed when dropped; and a minimal RESP2 client over `std::net::TcpStream` to talk to them
//! ([`Resp`], [`RedisConn`], [`Redis::cmd`], [`Monitor`]).
//!
//! The binaries are the Debian packages `redis-server` and `redis-tools` (`redis-cli`, which joins a
//! cluster), found on PATH or in /usr/sbin; `tools/test` installs them. Without them these tests fail (they
//! do not skip). Only the binaries are run, from command-line options, never the system service.

use std::fmt;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;

use super::{find_binary, TempDir};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one command of [`Redis::cmd`] may take (connect, write, read its reply).
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server may take to answer PING after it is started, and a cluster to report `cluster_state:ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The cluster bus of a node listens on its port + 10000.
const BUS_OFFSET: u16 = 10000;
/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

// ---------------------------------------------------------------------------------------------------------
// RESP2

/// One RESP2 reply.
#[derive(Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...` (the text after the `-`)
    Error(String),
    /// `:42`
    Int(i64),
    /// `$3\r\nfoo` (None for the null bulk string `$-1`)
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...` (None for the null array `*-1`), nested replies inside
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The integer of an `Int` reply.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Resp::Int(n) => Some(*n),
            _ => None,
        }
    }

    /// The text of a simple string or of a UTF-8 bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Resp::Simple(s) => Some(s),
            Resp::Bulk(Some(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The bytes of a bulk string (or of a simple string).
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Resp::Simple(s) => Some(s.as_bytes()),
            Resp::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }

    /// The elements of a (non-null) array.
    pub fn as_array(&self) -> Option<&[Resp]> {
        match self {
            Resp::Array(Some(items)) => Some(items),
            _ => None,
        }
    }

    /// The message of an error reply.
    pub fn as_error(&self) -> Option<&str> {
        match self {
            Resp::Error(e) => Some(e),
            _ => None,
        }
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Resp::Error(_))
    }

    /// Whether this is a null bulk string or a null array.
    pub fn is_null(&self) -> bool {
        matches!(self, Resp::Bulk(None) | Resp::Array(None))
    }

    /// Whether this is `+OK`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Resp::Simple(s) if s == "OK")
    }

    /// The array's elements as strings (bulk or simple); None when not an array or an element is not text.
    pub fn as_strings(&self) -> Option<Vec<String>> {
        self.as_array()?.iter().map(|r| r.as_str().map(str::to_string)).collect()
    }
}

impl fmt::Debug for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resp::Simple(s) => write!(f, "+{s}"),
            Resp::Error(e) => write!(f, "-{e}"),
            Resp::Int(n) => write!(f, ":{n}"),
            Resp::Bulk(None) => write!(f, "(nil)"),
            Resp::Bulk(Some(b)) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Resp::Array(None) => write!(f, "(nil array)"),
            Resp::Array(Some(items)) => f.debug_list().entries(items).finish(),
        }
    }
}

/// A command as RESP: an array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one whole reply (nested arrays included).
pub fn read_resp(r: &mut impl BufRead) -> io::Result<Resp> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(1);
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, format!("bad RESP {what}: {line:?}"));
    let len = |rest: &str| rest.parse::<i64>().map_err(|_| bad("length"));
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Int(rest.parse().map_err(|_| bad("integer"))?),
        "$" => match len(rest)? {
            -1 => Resp::Bulk(None),
            n if n >= 0 => {
                let mut body = vec![0u8; n as usize + 2];
                r.read_exact(&mut body)?;
                if !body.ends_with(b"\r\n") {
                    return Err(bad("bulk string (no CRLF after it)"));
                }
                body.truncate(n as usize);
                Resp::Bulk(Some(body))
            }
            _ => return Err(bad("bulk length")),
        },
        "*" => match len(rest)? {
            -1 => Resp::Array(None),
            n if n >= 0 => Resp::Array(Some((0..n).map(|_| read_resp(r)).collect::<io::Result<_>>()?)),
            _ => return Err(bad("array length")),
        },
        _ => return Err(bad("type")),
    })
}

/// One CRLF-terminated line, without the CRLF; an EOF error at the end of the stream.
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(ErrorKind::UnexpectedEof, "connection closed by redis"));
    }
    if !line.ends_with(b"\r\n") || line.len() < 3 {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("bad RESP line: {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))
}

/// One connection to a Redis server, for commands that need a connection of their own (SUBSCRIBE,
/// SSUBSCRIBE, MULTI, CLIENT ...). Every read and write has a timeout.
pub struct RedisConn {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl RedisConn {
    /// Connects with `timeout` for the connect and for every later read and write.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<RedisConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(RedisConn { reader: BufReader::new(stream), addr })
    }

    /// Sends one command without reading a reply.
    pub fn send(&mut self, args: &[&str]) -> io::Result<()> {
        self.reader.get_mut().write_all(&encode_command(args))
    }

    /// Reads one reply (or pushed message: a `message`/`smessage` array of a subscribed connection).
    pub fn read(&mut self) -> io::Result<Resp> {
        read_resp(&mut self.reader)
    }

    /// Reads one reply, waiting at most `timeout`: `Ok(None)` when nothing came in that time.
    pub fn read_within(&mut self, timeout: Duration) -> io::Result<Option<Resp>> {
        let stream = self.reader.get_ref();
        let before = stream.read_timeout()?;
        stream.set_read_timeout(Some(timeout))?;
        let r = if self.reader.buffer().is_empty() {
            // Only an empty buffer may time out: a reply half read stays whole for the next call.
            match self.reader.fill_buf() {
                Ok(_) => read_resp(&mut self.reader).map(Some),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            read_resp(&mut self.reader).map(Some)
        };
        self.reader.get_ref().set_read_timeout(before)?;
        r
    }

    /// Sends one command and reads its reply.
    pub fn try_call(&mut self, args: &[&str]) -> io::Result<Resp> {
        self.send(args)?;
        self.read()
    }

    /// [`RedisConn::try_call`], panicking (with the command and server) on an I/O failure. An error reply
    /// is returned, not a panic.
    pub fn call(&mut self, args: &[&str]) -> Resp {
        self.try_call(args).unwrap_or_else(|e| panic!("redis {} {args:?}: {e}", self.addr))
    }

    /// The socket, e.g. to shut it down.
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisConn({})", self.addr)
    }
}

// ---------------------------------------------------------------------------------------------------------
// One server

/// One `redis-server` on a loopback port, in a temporary directory of its own, with no persistence
/// (`--save '' --appendonly no`). Killed (SIGKILL) on drop, and its directory removed.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    pid: u32,
    dir: TempDir,
    /// Options after the common ones (the cluster's).
    extra: Vec<String>,
    /// Its stdout (the log) so far, across restarts.
    log: Arc<Mutex<String>>,
}

impl Redis {
    /// Starts a standalone server on a free port and waits until it answers PING.
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// [`Redis::start`] with extra `redis-server` options (e.g. `["--maxmemory", "10mb"]`).
    pub fn start_with(extra: &[&str]) -> Redis {
        Self::launch(super::fresh_port, "standalone", extra)
    }

    /// Starts a server on a port from `port()` (tried again with another one when it is taken meanwhile).
    fn launch(port: impl Fn() -> u16, tag: &str, extra: &[&str]) -> Redis {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for attempt in 1.. {
            let port = port();
            let mut redis = Redis {
                child: None,
                port,
                pid: 0,
                dir: TempDir::new("redis", &format!("{tag}-{port}")),
                extra: extra.clone(),
                log: Arc::new(Mutex::new(String::new())),
            };
            match redis.spawn_and_wait() {
                Ok(()) => return redis,
                Err(log) if attempt < 5 && log.contains("in use") => continue,
                Err(log) => panic!("redis-server did not start on port {port} (options {extra:?}):\n{log}"),
            }
        }
        unreachable!()
    }

    /// Spawns the process on `self.port` and waits until it answers PING; Err(log) if it exits first or
    /// does not answer in time.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let binary = find_binary("redis-server", "redis-server redis-tools");
        let mut cmd = Command::new(&binary);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile", "", "--loglevel", "notice", "--dir"])
            .arg(self.dir.path())
            .args(&self.extra)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", binary.display()));
        super::capture_output(&mut child, &self.log);
        self.pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                self.child = None;
                std::thread::sleep(Duration::from_millis(100)); // the rest of its output
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if let Ok(r) = self.try_cmd_within(Duration::from_millis(500), &["PING"]) {
                if r.as_str() == Some("PONG") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no PONG within {READY_TIMEOUT:?}\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on (the same across [`Redis::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The process id of the current (or, once killed, the last) process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its output so far (all runs).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The directory it runs in (its `--dir`; a cluster node's `nodes.conf` is there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn signal(&self, sig: libc::c_int) {
        if self.child.is_some() {
            // SAFETY: kill takes no pointers; `pid` is our child, not reaped yet (so not reused).
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }

    /// SIGKILL, and waits for the process to be gone. Nothing happens if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: as in `signal`: our unreaped child.
                unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            }
            let _ = child.wait();
        }
    }

    /// Kills the process if it runs and starts a new one on the same port, in the same directory, with the
    /// same options (a cluster node reads its `nodes.conf` back and rejoins), waiting until it answers PING.
    /// Its data is gone (no persistence).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The port is ours, but a connection the dead process had may hold it a moment.
                Err(log) if log.contains("in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(log) => panic!("redis-server did not restart on port {}:\n{log}", self.port),
            }
        }
    }

    /// Freezes the process (SIGSTOP): connections are accepted by the kernel but nothing is answered.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// A new connection, with [`REDIS_TIMEOUT`] on every read and write; panics if it cannot connect.
    pub fn connect(&self) -> RedisConn {
        RedisConn::connect(self.addr(), REDIS_TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to redis {}: {e}\n{}", self.addr(), self.log()))
    }

    /// Runs one command on a new connection and returns its reply; panics (with the command, the server
    /// and its log) on an I/O failure or timeout. An error reply is returned, not a panic.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis {} {args:?}: {e}\n--- redis log ---\n{}", self.addr(), self.log()))
    }

    /// [`Redis::cmd`] returning the I/O error instead of panicking.
    pub fn try_cmd(&self, args: &[&str]) -> io::Result<Resp> {
        self.try_cmd_within(REDIS_TIMEOUT, args)
    }

    /// [`Redis::try_cmd`] with `timeout` for the connect, the write and the reply.
    pub fn try_cmd_within(&self, timeout: Duration, args: &[&str]) -> io::Result<Resp> {
        RedisConn::connect(self.addr(), timeout)?.try_call(args)
    }

    /// A connection in MONITOR mode, its lines collected in the background from now on.
    pub fn monitor(&self) -> Monitor {
        Monitor::start(self.addr()).unwrap_or_else(|e| panic!("MONITOR on redis {}: {e}", self.addr()))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.resume(); // harmless when running; a stopped process dies of SIGKILL anyway
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- redis-server (port {}) output ---\n{}", self.port, self.log());
        }
    }
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redis(127.0.0.1:{}, pid {})", self.port, self.pid)
    }
}

/// A MONITOR connection: every command the server runs, one line each (`1700000000.123456 [0
/// 127.0.0.1:5555] "SET" "k" "v"`), collected by a background thread until dropped.
pub struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    stream: TcpStream,
}

impl Monitor {
    /// Connects, sends MONITOR and waits for its `+OK`: commands sent after this returns are seen.
    fn start(addr: SocketAddr) -> io::Result<Monitor> {
        let mut conn = RedisConn::connect(addr, REDIS_TIMEOUT)?;
        let ok = conn.try_call(&["MONITOR"])?;
        if !ok.is_ok() {
            return Err(io::Error::other(format!("MONITOR answered {ok:?}")));
        }
        let stream = conn.stream().try_clone()?;
        // The reader blocks until a line comes or the connection is shut down (on drop).
        conn.stream().set_read_timeout(None)?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            while let Ok(r) = conn.read() {
                let line = match r.as_str() {
                    Some(s) => s.to_string(),
                    None => format!("{r:?}"),
                };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(Monitor { lines, stream })
    }

    /// The lines received so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to `timeout` for a line for which `pred` holds, and returns it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The lines whose command (first quoted word) is `command`, case-insensitively (e.g. `"SPUBLISH"`).
    pub fn commands(&self, command: &str) -> Vec<String> {
        let quoted = format!("\"{}\"", command.to_ascii_lowercase());
        self.lines()
            .into_iter()
            .filter(|l| {
                l.split_once("] ")
                    .and_then(|(_, rest)| rest.split(' ').next())
                    .is_some_and(|c| c.to_ascii_lowercase() == quoted)
            })
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Monitor({} lines)", self.lines.lock().map_or(0, |l| l.len()))
    }
}

// ---------------------------------------------------------------------------------------------------------
// A cluster

/// A Redis Cluster of masters only (no replicas): `redis-server --cluster-enabled yes` nodes on free ports
/// whose cluster-bus ports (port + 10000) were free too, joined with `redis-cli --cluster create`, every
/// node reporting `cluster_state:ok` with all 16384 slots assigned and every other node known.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3, as `redis-cli --cluster create` requires) nodes and joins them.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs at least 3 masters, not {masters}");
        let cli = find_binary("redis-cli", "redis-tools");
        let opts =
            ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"];
        let nodes: Vec<Redis> = (0..masters).map(|_| Redis::launch(cluster_port, "cluster", &opts)).collect();
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]).stdin(Stdio::null());
        let out = create.output().unwrap_or_else(|e| panic!("running {}: {e}", cli.display()));
        let cluster = RedisCluster { nodes };
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(READY_TIMEOUT);
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`, all slots assigned and every node known; panics
    /// with the last CLUSTER INFO seen after `timeout`. Also for after a node's [`Redis::restart`].
    pub fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut bad = None;
            for n in &self.nodes {
                let info = match n.try_cmd_within(Duration::from_secs(1), &["CLUSTER", "INFO"]) {
                    Ok(r) => r.as_str().unwrap_or_default().to_string(),
                    Err(e) => e.to_string(),
                };
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .map(str::trim)
                        .map(str::to_string)
                };
                let ok = field("cluster_state").as_deref() == Some("ok")
                    && field("cluster_slots_assigned").as_deref() == Some(&*SLOTS.to_string())
                    && field("cluster_slots_ok").as_deref() == Some(&*SLOTS.to_string())
                    && field("cluster_known_nodes").as_deref() == Some(&*self.nodes.len().to_string());
                if !ok {
                    bad = Some((n.port(), info));
                    break;
                }
            }
            match bad {
                None => return,
                Some((port, info)) if Instant::now() > deadline => {
                    panic!("the cluster is not ok after {timeout:?}: node {port} says:\n{info}")
                }
                Some(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Every node's `redis://127.0.0.1:PORT/`, in [`RedisCluster::nodes`] order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// The masters (each a [`Redis`]: `cmd`, `kill`, `restart`, `pause`...).
    pub fn nodes(&self) -> &[Redis] {
        &self.nodes
    }

    /// The masters, mutably (to kill or restart one).
    pub fn nodes_mut(&mut self) -> &mut [Redis] {
        &mut self.nodes
    }

    /// The hash slot of `key` (see [`key_slot`]).
    pub fn slot_of(&self, key: &str) -> u16 {
        key_slot(key.as_bytes())
    }

    /// The index (in [`RedisCluster::nodes`]) of the node serving `slot`, from CLUSTER SLOTS asked of the
    /// first node that answers.
    pub fn node_for_slot(&self, slot: u16) -> usize {
        let reply = self
            .nodes
            .iter()
            .find_map(|n| n.try_cmd(&["CLUSTER", "SLOTS"]).ok().filter(|r| !r.is_error()))
            .expect("no node answers CLUSTER SLOTS");
        for range in reply.as_array().unwrap_or_else(|| panic!("CLUSTER SLOTS: {reply:?}")) {
            let r = range.as_array().unwrap_or_else(|| panic!("CLUSTER SLOTS range: {range:?}"));
            let (lo, hi) = (r[0].as_int().expect("range start"), r[1].as_int().expect("range end"));
            if (lo..=hi).contains(&i64::from(slot)) {
                let master = r[2].as_array().expect("the range's master");
                let port = master[1].as_int().expect("the master's port");
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port()) == port)
                    .unwrap_or_else(|| panic!("slot {slot} is on port {port}, not one of ours"));
            }
        }
        panic!("slot {slot} is not assigned: {reply:?}")
    }

    /// The node serving `key`'s slot.
    pub fn node_for_key(&self, key: &str) -> &Redis {
        &self.nodes[self.node_for_slot(self.slot_of(key))]
    }
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.nodes).finish()
    }
}

/// A free port whose cluster-bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = super::fresh_port();
        if port <= u16::MAX - BUS_OFFSET && TcpListener::bind(("127.0.0.1", port + BUS_OFFSET)).is_ok() {
            return port;
        }
    }
}

/// The engine's own slot and CRC16 functions: the harness's tests check them against a real Cluster
/// (`CLUSTER KEYSLOT`).
#[allow(unused_imports)]
pub use throng::relay::store::{crc16 as crc16_xmodem, slot as key_slot};

// ---------------------------------------------------------------------------------------------------------
// Helpers
