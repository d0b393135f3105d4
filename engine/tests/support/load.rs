//! A closed-loop echo load for tests that need a busy server: `conns` connections upgraded on `/echo`,
//! spread over a few threads; each thread writes one small message to each of its connections, then reads
//! every echo back, and repeats until stopped. Blocking sockets with timeouts: simple, and enough to keep a
//! CPU-capped shard saturated.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use throng_protocol::frame::OpCode;

use super::{client_frame, upgrade_request, SAMPLE_KEY};

/// A running echo load.
pub struct EchoLoad {
    stop: Arc<AtomicBool>,
    /// Echoes received so far, over all connections.
    pub echoes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoLoad {
    /// Connects `conns` clients (upgrading each) and starts `threads` threads driving them.
    pub fn start(addr: SocketAddr, conns: usize, threads: usize) -> EchoLoad {
        super::raise_nofile_limit();
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicU64::new(0));
        // Every connection is upgraded before any traffic starts.
        let mut socks = Vec::with_capacity(conns);
        for _ in 0..conns {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("load connect");
            s.set_nodelay(true).expect("nodelay");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
            s.write_all(upgrade_request("/echo", SAMPLE_KEY).as_bytes()).expect("load upgrade");
            read_head(&mut s);
            socks.push(s);
        }
        let per = conns.div_ceil(threads);
        let mut handles = Vec::new();
        while !socks.is_empty() {
            let mine: Vec<TcpStream> = socks.drain(..per.min(socks.len())).collect();
            let (stop, echoes) = (stop.clone(), echoes.clone());
            handles.push(std::thread::spawn(move || drive(mine, &stop, &echoes)));
        }
        EchoLoad { stop, echoes, threads: handles }
    }

    /// Stops the load and waits for its threads.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.echoes.load(Ordering::Relaxed)
    }
}

impl Drop for EchoLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_head(s: &mut TcpStream) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("load: reading the 101"), 1, "load: EOF in the 101");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "load: {}", String::from_utf8_lossy(&head));
}

fn drive(mut socks: Vec<TcpStream>, stop: &AtomicBool, echoes: &AtomicU64) {
    let frame = client_frame(true, OpCode::Binary, &[7u8; 32]);
    // The echo: 0x82, length 32, the payload.
    let mut echo = [0u8; 34];
    while !stop.load(Ordering::Relaxed) {
        for s in &mut socks {
            if s.write_all(&frame).is_err() {
                return;
            }
        }
        for s in &mut socks {
            if s.read_exact(&mut echo).is_err() {
                return;
            }
            echoes.fetch_add(1, Ordering::Relaxed);
        }
    }
}
