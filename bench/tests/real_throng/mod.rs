//! A real `throng` for bench tests: the debug build next to the test executable (`target/debug/throng`), or
//! `THRONG_BIN`, started with two shards and the backend API on a fresh port, killed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The API key every test server is started with.
pub const KEY: &str = "bench-test-api-key-0123456789";

/// A `throng` child process, killed on drop.
pub struct Throng {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Throng {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `throng` binary: `THRONG_BIN`, else the one built into this target directory.
fn throng_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("THRONG_BIN") {
        return p.into();
    }
    // target/debug/deps/<test>-<hash> -> target/debug/throng
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target directory").join("throng");
    assert!(bin.exists(), "{} is missing: build it first (cargo build -p throng)", bin.display());
    bin
}

impl Throng {
    /// Starts `throng --shards 2 --api-key KEY <extra>` on a fresh port and waits for `/health`; the
    /// environment's `THRONG_API_KEY` and `THRONG_JWT_SECRET` are not passed on.
    pub fn start(extra: &[&str]) -> Throng {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(throng_bin())
            .args(["--listen", &addr.to_string(), "--shards", "2", "--api-key", KEY])
            .args(extra)
            .env_remove("THRONG_API_KEY")
            .env_remove("THRONG_JWT_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn throng");
        let srv = Throng { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(addr) {
                let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                if out.starts_with(b"HTTP/1.1 200") {
                    return srv;
                }
            }
            assert!(Instant::now() < deadline, "throng did not come up on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's PID (for `--server-pid`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ws://` and the address.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}
