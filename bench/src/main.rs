//! The `throng-bench` binary: parses the arguments, runs the scenario (or a worker's share of it) and
//! prints the report.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use throng_bench::{run, worker_main, Args, Plan, WorkerCommand};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::from_args(&args)?;
    if plan.worker.is_some() {
        worker_main(&plan)?;
        return Ok(());
    }
    let worker = WorkerCommand {
        exe: std::env::current_exe().context("locating this executable for --procs")?,
        args: std::env::args_os().skip(1).collect(),
    };
    let report = run(&plan, &worker)?;
    let mut out = std::io::stdout().lock();
    if plan.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.human())?;
    }
    if let (Some(e), 0) = (&report.tally.tls_error, report.connect.ready) {
        // wss:// with no handshake through (an untrusted certificate, say): the run measured nothing.
        anyhow::bail!("no connection got through its TLS handshake: {e} (see the warnings)");
    }
    if let Some(a) = report.api.as_ref().filter(|a| a.ok + a.ok_late == 0) {
        // api-publish with no request served (a wrong key, the API off): the run measured nothing.
        let errors = a.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        anyhow::bail!("no API request succeeded ({errors}; see the warnings)");
    }
    Ok(())
}
