//! The `throng` binary: see the library crate for the engine.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    throng::run(throng::config::Cli::parse())
}
