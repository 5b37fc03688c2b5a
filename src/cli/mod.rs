//! The command line: its words (`args`), what each command does (`commands`), where the work
//! runs (`target`: the serving daemon or this process), what it shows while it works
//! (`progress`), and how it fails (`error`). `src/main.rs` parses and dispatches.

pub mod args;
pub mod commands;
pub mod error;
pub mod progress;
pub mod target;

pub use args::{Cli, Cmd, LimitArgs, LogFormat};
pub use error::CliError;

/// Logs to stderr, filtered by FERRYFS_LOG (default `default`: info for the daemon, warn for
/// the CLI's own work, so progress lines stay readable).
pub fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRYFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Span fields (op, ino of the FUSE request) ride along in "span"/"spans".
        LogFormat::Json => fmt.json().with_current_span(true).init(),
    }
}

/// `ferryfs status | head` ends quietly, as Unix tools do, instead of panicking on the closed
/// pipe. Only for status: it writes to stdout and reads files, no socket, so no other write
/// can meet a closed peer.
pub fn quiet_on_closed_stdout() {
    // SAFETY: setting a signal's disposition to the default, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
