//! The embedded files against the real binary: `/throng.js` (the JavaScript client, byte for byte the file in
//! `tools/client-js/`, with its content type and cache headers), `/throng.global.js` (the same as a classic
//! script), the demo page at `/` (on by default in the open development mode, off with a JWT key, `--demo`
//! either way), and the delivery latency `/stats` reports for the demo's figures.

#[macro_use]
mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use support::v1::{poll_until, Ws};
use support::{Driver, Server};

fn repo_file(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

on_both_drivers! {
    the_client_is_served_and_the_demo_page_by_the_mode => files_uring, files_epoll;
    stats_report_delivery_latency => latency_uring, latency_epoll;
}

const SECRET: &str = "static-files test secret, at least 32 bytes";

fn the_client_is_served_and_the_demo_page_by_the_mode(driver: Driver) {
    let open = Server::start(driver, &[]);
    let js = open.get("/throng.js");
    assert_eq!(js.status, 200, "{}", js.head);
    assert_eq!(js.header("content-type"), Some("application/javascript; charset=utf-8"));
    assert_eq!(js.header("cache-control"), Some("public, max-age=3600"));
    assert_eq!(js.header("x-content-type-options"), Some("nosniff"));
    assert!(js.body == repo_file("tools/client-js/throng.js"), "/throng.js is tools/client-js/throng.js");
    let global = open.get("/throng.global.js");
    assert_eq!(global.status, 200);
    assert_eq!(global.header("content-type"), Some("application/javascript; charset=utf-8"));
    let text = String::from_utf8(global.body).expect("UTF-8");
    assert!(text.starts_with("(function () {") && text.contains("globalThis.Throng = {"), "{}", &text[..80]);
    // Open development mode: the demo page is on.
    let page = open.get("/");
    assert_eq!(page.status, 200, "{}", page.head);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    assert!(page.body == repo_file("tools/client-js/demo.html"), "/ is tools/client-js/demo.html");
    assert_eq!(open.get("/index.html").status, 200);
    assert_eq!(open.get("/nothing-here").status, 404);
    drop(open);

    // Turned off: `/` is an unknown path again, the client is still served.
    let off = Server::start(driver, &["--demo", "false"]);
    assert_eq!(off.get("/").status, 404);
    assert_eq!(off.get("/throng.js").status, 200);
    drop(off);

    // With a JWT key the demo is off unless asked for.
    let jwt = Server::start(driver, &["--jwt-secret", SECRET]);
    let home = jwt.get("/");
    assert_eq!(home.status, 404, "{}", home.text());
    assert_eq!(jwt.get("/throng.js").status, 200);
    drop(jwt);
    let jwt_demo = Server::start(driver, &["--jwt-secret", SECRET, "--demo"]);
    assert_eq!(jwt_demo.get("/").status, 200);
}

fn stats_report_delivery_latency(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let before = srv.stats();
    assert_eq!(before["delivery_latency"], json!({"count": 0, "sum_us": 0}), "{before}");
    let mut sub = Ws::connect(&srv, "alice");
    sub.subscribe("chat:figures", None);
    let mut publisher = Ws::connect(&srv, "bob");
    for i in 0..3 {
        publisher.publish("chat:figures", json!(i));
    }
    for _ in 0..3 {
        assert_eq!(sub.recv()["type"], "message");
    }
    // Histograms reach the scrape once per tick (50 ms).
    let stats = poll_until(Duration::from_secs(5), || {
        let s = srv.stats();
        (s["delivery_latency"]["count"] == 3).then_some(s.clone()).ok_or_else(|| s.to_string())
    });
    assert!(stats["delivery_latency"]["sum_us"].as_u64().is_some(), "{stats}");
}
