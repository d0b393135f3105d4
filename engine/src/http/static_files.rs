//! The files Throng serves from its own binary: the JavaScript client at `/throng.js` (always; an ES
//! module), the same as a classic script at `/throng.global.js` (for a plain `<script src>`: it sets
//! `window.Throng`), and the demo page at `/` (when `demo` is on: by default in the open development mode).
//! They are embedded at build time (`include_str!`) from `tools/client-js/`, so the binary needs no files
//! beside it.

use std::sync::OnceLock;

/// The browser and Node client (`tools/client-js/throng.js`): an ES module (loaded as one in a browser it
/// also sets `window.Throng`).
pub const CLIENT_JS: &str = include_str!("../../../tools/client-js/throng.js");

/// The demo page: a room chat with presence and a live panel of the node's figures, built on `/throng.js`.
pub const DEMO_HTML: &str = include_str!("../../../tools/client-js/demo.html");

/// The client as a classic script: its code in a function scope, its one trailing `export { ... }` turned
/// into `globalThis.Throng = { ... }` (the client keeps to that shape: no `import`, a single export list at
/// the end). Made once, on first request.
pub fn client_global_js() -> &'static str {
    static GLOBAL: OnceLock<String> = OnceLock::new();
    GLOBAL.get_or_init(|| match CLIENT_JS.rsplit_once("\nexport {") {
        Some((code, names)) => {
            format!("(function () {{\n\"use strict\";\n{code}\nglobalThis.Throng = {{{names}}})();\n")
        }
        None => format!("(function () {{\n\"use strict\";\n{CLIENT_JS}\n}})();\n"),
    })
}

/// One embedded file as served: its content type, `Cache-Control` and body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticFile {
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The `Cache-Control`: the client for an hour (it changes only with the binary; a page that must pick
    /// up a new one at once can load `/throng.js?v=<version>`), the page revalidated on every load.
    pub cache_control: &'static str,
    /// The bytes.
    pub body: &'static str,
}

/// The embedded file at `path`, if any: `/throng.js` always, `/` only with `demo` on (otherwise `/` is an
/// unknown path, as it was before the demo existed).
pub fn lookup(path: &str, demo: bool) -> Option<StaticFile> {
    match path {
        "/throng.js" => Some(StaticFile {
            content_type: "application/javascript; charset=utf-8",
            cache_control: "public, max-age=3600",
            body: CLIENT_JS,
        }),
        "/throng.global.js" => Some(StaticFile {
            content_type: "application/javascript; charset=utf-8",
            cache_control: "public, max-age=3600",
            body: client_global_js(),
        }),
        "/" | "/index.html" if demo => {
            Some(StaticFile { content_type: "text/html; charset=utf-8", cache_control: "no-cache", body: DEMO_HTML })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_always_served_and_the_page_only_with_demo_on() {
        let js = lookup("/throng.js", false).expect("/throng.js is always served");
        assert_eq!(js.content_type, "application/javascript; charset=utf-8");
        assert!(js.body.contains("class ThrongClient extends Emitter"), "the embedded file is the client");
        assert_eq!(lookup("/throng.js", true), Some(js));
        assert_eq!(lookup("/", false), None);
        assert_eq!(lookup("/index.html", false), None);
        let page = lookup("/", true).expect("the demo page with demo on");
        assert_eq!(page.content_type, "text/html; charset=utf-8");
        assert!(page.body.contains("/throng.js"), "the page loads the client from the server");
        assert_eq!(lookup("/demo.html", true), None);
    }

    #[test]
    fn the_classic_script_sets_a_global_and_exports_nothing() {
        let g = lookup("/throng.global.js", false).expect("served").body;
        assert!(g.starts_with("(function () {\n\"use strict\";\n"), "{}", &g[..40]);
        assert!(g.trim_end().ends_with("})();"));
        assert!(g.contains("\nglobalThis.Throng = { ThrongClient,"), "the export list became the global");
        assert!(!g.lines().any(|l| l.starts_with("export ") || l.starts_with("import ")), "no module syntax left");
    }
}
