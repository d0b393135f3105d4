//! `tuning/throng-tune` against this machine and against a real server: its `check --json` output has every
//! setting with its current and recommended value and an estimate with its binding limit; `--target` sets
//! the exit status; `apply` on a fake `/proc` tree raises what is low, keeps what is better, and reports
//! what it cannot change without failing. Then the estimate is held against what `throng` actually holds
//! under the same open-file limit, and against the limits line `throng` logs at start, on both drivers.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{upgrade_request, Driver, Server, SAMPLE_KEY};

on_both_drivers! {
    estimate_matches_what_a_server_holds =>
        estimate_matches_what_a_server_holds_uring, estimate_matches_what_a_server_holds_epoll;
    default_max_connections_is_the_estimate =>
        default_max_connections_is_the_estimate_uring, default_max_connections_is_the_estimate_epoll;
}

/// The open-file limit (soft and hard) the server and `throng-tune` run under: small enough to fill
/// quickly, large enough that a miscount of a few descriptors shows.
const NOFILE: u32 = 1200;
/// The test opens connections from one address faster than the default 1000 upgrades per second allow.
const NO_RATE_LIMIT: [&str; 2] = ["--max-upgrades-per-second-per-ip", "0"];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning/throng-tune")
}

/// Runs `throng-tune <args>`, under `prlimit --nofile=N:N` when `nofile` is given.
fn tune(args: &[&str], nofile: Option<u32>) -> Output {
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg(script());
            c
        }
        None => Command::new(script()),
    };
    cmd.args(args).env_remove("THRONG_SHARDS");
    cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", script().display()))
}

/// `throng-tune check --json <args>` parsed; panics with its stderr when it fails to run or print JSON.
fn check_json(args: &[&str], nofile: Option<u32>) -> (Option<i32>, Value) {
    let mut all = vec!["check", "--json"];
    all.extend_from_slice(args);
    let out = tune(&all, nofile);
    let text = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("check --json printed no JSON ({e}): {text}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code(), json)
}

#[test]
fn check_json_has_every_setting_and_an_estimate() {
    let (code, j) = check_json(&["--shards", "1"], None);
    assert_eq!(code, Some(0), "no --target: exit 0\n{j:#}");
    let settings = j["settings"].as_array().expect("settings");
    for s in settings {
        assert!(s["name"].is_string(), "{s}");
        assert!(s["current"].is_string() || s["current"].is_null(), "{s}");
        assert!(s["recommended"].is_string(), "{s}");
        assert!(s["ok"].is_boolean() || s["ok"].is_null(), "{s}");
    }
    let names: Vec<&str> = settings.iter().filter_map(|s| s["name"].as_str()).collect();
    for want in [
        "fs.file-max",
        "fs.nr_open",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_tw_reuse",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_max_tw_buckets",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.core.netdev_max_backlog",
        "rlimit.nofile",
        "rlimit.memlock",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // Everything this machine has is readable.
    let somaxconn = settings.iter().find(|s| s["name"] == "net.core.somaxconn").unwrap();
    let kernel = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();
    assert_eq!(somaxconn["current"], kernel.trim(), "{somaxconn}");

    let limits = j["limits"].as_array().expect("limits");
    let names: Vec<&str> = limits.iter().filter_map(|l| l["name"].as_str()).collect();
    for want in ["open_files", "file_max", "memory", "tcp_mem"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for l in limits {
        assert!(l["sockets"].is_u64() && l["detail"].is_string(), "{l}");
    }
    let min = limits.iter().filter_map(|l| l["sockets"].as_u64()).min().unwrap();
    assert_eq!(j["estimate"]["sockets"], min, "the estimate is the lowest limit\n{j:#}");
    let binding = j["estimate"]["binding"].as_str().expect("binding");
    assert!(limits.iter().any(|l| l["name"] == binding && l["sockets"] == min), "{j:#}");

    // Memory per socket from the kernel's own figures plus Throng's: a few KiB.
    let per = &j["per_socket_bytes"];
    let total = per["total"].as_u64().expect("per_socket_bytes.total");
    assert!((1500..16384).contains(&total), "{per}");
    assert_eq!(per["total"].as_u64(), Some(per["kernel_total"].as_u64().unwrap() + per["throng"].as_u64().unwrap()));
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let range: Vec<u64> = range.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(j["outbound"]["ports"], range[1] - range[0] + 1, "{}", j["outbound"]);
    assert_eq!(j["open_files"]["shards"], 1);
}

#[test]
fn target_sets_the_exit_status() {
    let (code, j) = check_json(&["--target", "1"], None);
    assert_eq!(code, Some(0), "{j:#}");
    assert_eq!(j["meets_target"], true);
    let (code, j) = check_json(&["--target", "1000000000000"], None);
    assert_eq!(code, Some(1), "{j:#}");
    assert_eq!(j["meets_target"], false);
    // The table says the same in words.
    let out = tune(&["check", "--target", "1000000000000"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("NOT met") && text.contains("bound by"), "{text}");
    assert!(text.contains("net.core.somaxconn") && text.contains("recommended"), "{text}");
    let out = tune(&["check", "--target", "1"], None);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A fake `/proc` with low, high and unwritable values: `apply` raises what is low, keeps what is
/// better, reports the unwritable one and the absent optional one, and exits 0; a second run changes
/// nothing. `check` on the same tree (no meminfo, no slabinfo) still gives an estimate.
#[test]
fn apply_raises_keeps_and_reports_on_a_fake_proc() {
    let dir = std::env::temp_dir().join(format!("throng-tune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let put = |name: &str, value: &str| {
        let p = dir.join("sys").join(name.replace('.', "/"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{value}\n")).unwrap();
    };
    put("fs.file-max", "100000");
    put("fs.nr_open", "1048576");
    put("fs.epoll.max_user_watches", "9999999");
    put("net.core.somaxconn", "128");
    put("net.ipv4.tcp_max_syn_backlog", "512");
    put("net.ipv4.tcp_syncookies", "1");
    put("net.ipv4.ip_local_port_range", "32768\t60999");
    put("net.ipv4.tcp_tw_reuse", "2");
    put("net.ipv4.tcp_fin_timeout", "10");
    put("net.ipv4.tcp_max_tw_buckets", "4096");
    put("net.ipv4.tcp_max_orphans", "4096");
    put("net.ipv4.tcp_mem", "100000 200000 300000");
    put("net.ipv4.tcp_rmem", "4096\t131072\t6291456");
    put("net.ipv4.tcp_wmem", "4096\t16384\t4194304");
    // Read-only, as in a container: a link to a 0444 sysctl, which even root cannot write (EACCES).
    let ro = dir.join("sys/net/core/netdev_max_backlog");
    std::os::unix::fs::symlink("/proc/sys/fs/file-nr", &ro).unwrap();
    // net.netfilter.nf_conntrack_max is absent (module not loaded).
    let proc = format!("--proc={}", dir.display());

    let out = tune(&["apply", proc.as_str(), "--target", "1000"], None);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let get = |name: &str| {
        let v = std::fs::read_to_string(dir.join("sys").join(name.replace('.', "/"))).unwrap();
        v.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    assert_eq!(get("fs.file-max"), "4194304", "{text}");
    assert_eq!(get("net.core.somaxconn"), "65535");
    assert_eq!(get("net.ipv4.ip_local_port_range"), "1024 65535");
    assert_eq!(get("net.ipv4.tcp_tw_reuse"), "1");
    assert_eq!(get("fs.epoll.max_user_watches"), "9999999", "a higher capacity is kept");
    assert_eq!(get("net.ipv4.tcp_fin_timeout"), "10", "a shorter timeout is kept");
    assert_eq!(get("net.ipv4.tcp_rmem"), "4096 16384 4194304", "per-socket buffers are capped");
    // tcp_mem sized for 1000 sockets is below what is there: kept.
    assert_eq!(get("net.ipv4.tcp_mem"), "100000 200000 300000");
    assert!(text.contains("net.core.netdev_max_backlog") && text.contains("not changed"), "{text}");
    assert!(text.contains("net.netfilter.nf_conntrack_max: absent here (optional)"), "{text}");
    assert!(text.contains("could not change 2"), "{text}");

    let again = tune(&["apply", proc.as_str(), "--target", "1000"], None);
    let text = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again.status.code(), Some(0), "{text}");
    assert!(text.contains("changed 0,"), "a second apply changes nothing:\n{text}");

    let (code, j) = check_json(&[proc.as_str(), "--shards", "2"], Some(NOFILE));
    assert_eq!(code, Some(0), "{j:#}");
    assert_eq!(j["estimate"]["binding"], "open_files", "{j:#}");
    assert_eq!(j["per_socket_bytes"]["kernel_source"].as_str().map(|s| s.starts_with("typical")), Some(true));
    let ro_row = j["settings"].as_array().unwrap().iter().find(|s| s["name"] == "net.core.netdev_max_backlog");
    assert!(ro_row.is_some_and(|r| r["ok"] == false), "{ro_row:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What one connection attempt got.
enum Attempt {
    /// Upgraded: the socket is held open.
    Held(TcpStream),
    /// An HTTP status other than 101 (503 at capacity).
    Refused(u16),
    /// No answer within the timeout, or the connection was closed: the server is out of descriptors and
    /// the connection waits in the listen queue.
    NoAnswer,
}

/// Connects and sends an upgrade for `/echo`, waiting up to `timeout` for the response head.
fn attempt(addr: SocketAddr, timeout: Duration) -> Attempt {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else { return Attempt::NoAnswer };
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    if s.write_all(upgrade_request("/echo", SAMPLE_KEY).as_bytes()).is_err() {
        return Attempt::NoAnswer;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while support::find(&head, b"\r\n\r\n").is_none() {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return Attempt::NoAnswer,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let status = String::from_utf8_lossy(&head).split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    if status == 101 {
        Attempt::Held(s)
    } else {
        Attempt::Refused(status)
    }
}

/// Opens connections to `/echo` one at a time until one is not upgraded; returns those held and how the
/// first one that was not ended.
fn fill(srv: &Server, most: usize, wait: Duration) -> (Vec<TcpStream>, Option<u16>) {
    let mut held = Vec::new();
    while held.len() < most {
        match attempt(srv.addr, wait) {
            Attempt::Held(s) => held.push(s),
            Attempt::Refused(status) => return (held, Some(status)),
            Attempt::NoAnswer => return (held, None),
        }
    }
    panic!("{most} connections held and still going");
}

/// The `connection_capacity` the server logged at start.
fn logged_capacity(srv: &Server) -> u64 {
    let log = srv.log();
    let line =
        log.lines().find(|l| l.contains("connection_capacity=")).unwrap_or_else(|| panic!("no limits line:\n{log}"));
    for field in
        ["open_files_soft=", "open_files_hard=", "memlock=", "somaxconn=", "listen_backlog=4096", "fds_at_start=3"]
    {
        assert!(line.contains(field), "{field} missing from the limits line: {line}");
    }
    let v = line.split("connection_capacity=").nth(1).unwrap();
    v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap_or_else(|_| panic!("{line}"))
}

/// Marks every descriptor of this process above stderr close-on-exec, so that a server it starts begins
/// with stdin, stdout and stderr only, as under systemd. (Descriptors leaked by whatever started the test
/// runner, such as a jobserver pipe, would otherwise be inherited: the server counts them and keeps them
/// out of its estimate, which `throng-tune`, assuming a clean start, cannot know about.)
fn no_inherited_fds() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl with F_GETFD takes no pointers; on a descriptor that is no longer open (the directory
        // listing's own) it fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 {
            // SAFETY: as above; F_SETFD only changes this process's close-on-exec flag of `fd`.
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        }
    }
}

fn server_fds(srv: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", srv.pid())).map(|d| d.count()).unwrap_or(0)
}

/// `throng-tune`'s estimate and the server's logged capacity agree, and the server, allowed far more
/// connections than its descriptors hold, holds that many give or take the reserve: it runs out of
/// descriptors (every one of its `NOFILE` in use) within 2% (or 10) of the estimate. The warning that
/// `max_connections` exceeds the open-file limit is logged.
fn estimate_matches_what_a_server_holds(driver: Driver) {
    support::raise_nofile_limit();
    no_inherited_fds();
    let (code, j) = check_json(&["--shards", "1"], Some(NOFILE));
    assert_eq!(code, Some(0), "{j:#}");
    assert_eq!(j["estimate"]["binding"], "open_files", "{j:#}");
    let estimate = j["estimate"]["sockets"].as_u64().unwrap();
    let reserve = j["open_files"]["reserve"].as_u64().unwrap();
    assert_eq!(j["open_files"]["nofile_hard"], NOFILE);

    let args = ["--max-connections", "100000", NO_RATE_LIMIT[0], NO_RATE_LIMIT[1]];
    let srv = Server::start_with_nofile(driver, &args, Some(NOFILE));
    let logged = logged_capacity(&srv);
    assert_eq!(logged, estimate, "the engine's estimate and throng-tune's differ");
    let log = srv.log();
    let warning = log.lines().find(|l| l.contains("max_connections exceeds what the open-file limit can hold"));
    let warning = warning.unwrap_or_else(|| panic!("no warning for max_connections 100000:\n{log}"));
    assert!(warning.contains("WARN") && warning.contains("open_files"), "{warning}");

    let started = Instant::now();
    let (held, refused) = fill(&srv, 2 * NOFILE as usize, Duration::from_secs(1));
    let n = held.len() as u64;
    eprintln!(
        "{driver:?}: held {n} connections under nofile {NOFILE} (server fds {}), estimate {estimate} \
         (throng-tune and the log), in {:?}",
        server_fds(&srv),
        started.elapsed()
    );
    assert_eq!(refused, None, "refused with a status before running out of descriptors");
    assert_eq!(server_fds(&srv), NOFILE as usize, "the server stopped short of its descriptor limit");
    let tolerance = (estimate / 50).max(10);
    assert!(n.abs_diff(estimate) <= tolerance, "held {n}, estimate {estimate} (tolerance {tolerance})");
    assert!(n >= estimate, "held {n} < estimate {estimate}: the estimate promises descriptors the server lacks");
    assert!(n <= estimate + reserve, "held {n}: more than the estimate plus its {reserve} reserve");
}

/// Without `--max-connections` the server takes the estimate as its limit: it holds exactly that many, and
/// the next connection gets 503 at once (with a descriptor to spare for it). No limit warning.
fn default_max_connections_is_the_estimate(driver: Driver) {
    support::raise_nofile_limit();
    no_inherited_fds();
    let (_, j) = check_json(&["--shards", "1"], Some(NOFILE));
    let estimate = j["estimate"]["sockets"].as_u64().unwrap();
    let srv = Server::start_with_nofile(driver, &NO_RATE_LIMIT, Some(NOFILE));
    let logged = logged_capacity(&srv);
    assert_eq!(logged, estimate);
    assert!(srv.log().contains(&format!("max_connections={estimate}")), "{}", srv.log());
    assert!(!srv.log().contains("exceeds"), "{}", srv.log());
    let (held, refused) = fill(&srv, 2 * NOFILE as usize, Duration::from_secs(5));
    eprintln!("{driver:?}: held {} connections, then {refused:?}; estimate {estimate}", held.len());
    assert_eq!(refused, Some(503));
    assert_eq!(held.len() as u64, estimate);
}
