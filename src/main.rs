//! The `ferryfs` command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ferryfs::daemon::{self, MountArgs};
use ferryfs::state;
use ferryfs::store::StoreSpec;

#[derive(Parser)]
#[command(
    name = "ferryfs",
    version,
    about = "Move a live dataset from an OLD store to a NEW store with no downtime"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check both stores, record them, and create the migration's journal in the state dir.
    Prepare {
        /// The store the data lives in today (an absolute directory path, or posix:/path).
        #[arg(long)]
        old: String,
        /// The store the data moves to; must be empty unless --allow-nonempty-new.
        #[arg(long)]
        new: String,
        /// The migration's state directory (journal, lock, log). Must not be inside a store.
        #[arg(long)]
        state: PathBuf,
        /// Accept a NEW that already holds entries; they win over OLD's in the view.
        #[arg(long)]
        allow_nonempty_new: bool,
    },
    /// Serve the view at MOUNTPOINT (which may be OLD's own path). Returns once it serves.
    Mount {
        #[arg(long)]
        state: PathBuf,
        mountpoint: PathBuf,
        /// Stay attached (for systemd and containers) instead of serving in the background.
        #[arg(long)]
        foreground: bool,
        /// Do not run the background copier. (This build has no copier yet, so the view never
        /// copies in the background either way.)
        #[arg(long)]
        no_copy: bool,
        /// Mount options, comma separated: allow_other, allow_root, ro, nosuid, nodev, ...
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
    /// Show the migration's phase and progress.
    Status {
        #[arg(long)]
        state: PathBuf,
        /// One JSON object, for machines.
        #[arg(long)]
        json: bool,
    },
    /// Unmount a view and wait for its daemon to exit.
    Unmount { mountpoint: PathBuf },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRYFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run() -> Result<(), String> {
    let raw: Vec<OsString> = std::env::args_os().skip(1).collect();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Prepare {
            old,
            new,
            state,
            allow_nonempty_new,
        } => {
            let old = StoreSpec::parse(&old)?;
            let new = StoreSpec::parse(&new)?;
            let t = state::prepare(old.clone(), new.clone(), &state, allow_nonempty_new)
                .map_err(|e| e.to_string())?;
            println!(
                "prepared: OLD {old} ({} dirs, {} files, {} bytes) -> NEW {new}; state in {}",
                t.dirs,
                t.files,
                t.bytes,
                state.display()
            );
            Ok(())
        }
        Cmd::Mount {
            state,
            mountpoint,
            foreground,
            no_copy: _,
            options,
            threads,
        } => {
            let args = MountArgs {
                state,
                mountpoint,
                options,
                threads,
            };
            if foreground {
                let ready = daemon::ready_pipe_from_env();
                daemon::block_termination_signals();
                init_logging();
                daemon::serve(&args, ready)
            } else {
                daemon::spawn_background(&args, &raw)
            }
        }
        Cmd::Status { state, json } => {
            let s = state::status(&state).map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string(&s).expect("status serializes"));
            } else {
                println!(
                    "phase:      {}{}",
                    s.phase,
                    if s.mounted { " (view mounted)" } else { "" }
                );
                println!("OLD:        {}", s.old);
                println!("NEW:        {}", s.new);
                println!("dirs:       {} of {} copied", s.dirs.done, s.dirs.total);
                println!("files:      {} of {} copied", s.files.done, s.files.total);
                println!("bytes:      {} of {} copied", s.bytes.done, s.bytes.total);
                println!(
                    "local:      {} entries in NEW (born or changed through the view)",
                    s.local
                );
                println!("tombstones: {}", s.tombstones);
                println!("redirects:  {}", s.redirects);
                println!("errors:     {}", s.errors.len());
            }
            Ok(())
        }
        Cmd::Unmount { mountpoint } => daemon::unmount(&mountpoint),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryfs: {e}");
            ExitCode::FAILURE
        }
    }
}
