//! `throng-bench`: the load generator bundled with Throng.
//!
//! It speaks only the wire protocol (RFC 6455 through `throng-protocol`'s client encoder and state
//! machine, plus Throng v1's JSON commands), so the same load runs against Throng (`--target throng`) and
//! against any server that follows the comparison peers' plain contract (`--target raw`: `/echo` echoes,
//! `/broadcast` relays to every connection). Scenarios: `connect`, `echo`, `broadcast`, `churn`, and
//! `api-publish` (Throng's backend HTTP API, `POST /api/publish`, over keep-alive connections).
//!
//! The client must cost far less per message than the servers it measures, so each thread runs one epoll
//! loop over its share of nonblocking sockets, reads 64 KiB at a time, parses frames in place, finds the
//! payload stamp with a substring search and never allocates per message. Past one process's open-file
//! limit, `--procs P` re-executes the binary as P workers coordinated over their stdin/stdout.
//!
//! # Layout
//! - [`cli`]: arguments ([`Args`]), their validation into a [`Plan`], connection roles and the split of the
//!   connections over processes and threads.
//! - [`fleet`]: running a plan ([`run`]): the threads of this process or worker processes, the common start
//!   time, server sampling, the worker protocol ([`worker_main`]).
//! - [`client`]: the per-thread epoll event loop: connect, upgrade, subscribe, send, receive, count.
//! - [`payload`]: the stamp `"bt":[time,sender,seq]` carried in every measured message, v1 commands.
//! - [`seq`]: per-sender sequence tracking: gaps, late (reordered) messages, duplicates.
//! - [`load`]: the bench threads' own load, sampled in short intervals (is the client the limit?).
//! - [`tally`]: raw counts and histograms, merged across threads and processes.
//! - [`hist`]: hdrhistogram latency recording and its lossless transfer between processes.
//! - [`report`]: derived figures, the JSON report and the human summary.
//! - [`jwt`]: per-connection JSON Web Tokens (HS256, RS256, ES256) minted with `jsonwebtoken`, and where
//!   the upgrade request carries them.
//! - [`tls`]: `wss://`: rustls handshakes (ring), then records sealed and opened in place with ring's AEADs,
//!   so TLS adds no allocation per message either.
//! - [`poll`], [`addr`], [`sys`]: epoll and sockets, URLs and source addresses, clocks and `/proc`.

pub mod addr;
pub mod cli;
pub mod client;
pub mod error;
pub mod fleet;
pub mod hist;
pub mod jwt;
pub mod load;
pub mod payload;
pub mod poll;
pub mod report;
pub mod seq;
pub mod sys;
pub mod tally;
pub mod tls;

pub use cli::{Args, Plan, Scenario, Target};
pub use error::Error;
pub use fleet::{run, worker_main, WorkerCommand};
pub use report::Report;
