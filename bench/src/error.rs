//! The library's error type.

/// Why a benchmark run could not be carried out. Failures of individual connections are not errors: they
/// are counted in the report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid arguments or an impossible plan.
    #[error("{0}")]
    Config(String),
    /// A system call the run depends on failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// A worker process failed or sent something unreadable.
    #[error("worker {0}: {1}")]
    Worker(usize, String),
}
