//! The `ferryfs` command: parse the command line and hand each subcommand to
//! `ferryfs::cli::commands`. Nothing else lives here.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use ferryfs::cli::commands;
use ferryfs::cli::{self, Cli, CliError, Cmd};
use ferryfs::control::Request;
use ferryfs::daemon::MountArgs;

fn main() -> ExitCode {
    let raw: Vec<OsString> = std::env::args_os().skip(1).collect();
    let matches = Cli::command().get_matches();
    let mut parsed = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Cmd::Prepare(p), Some(("prepare", m))) = (&mut parsed.cmd, matches.subcommand())
        && let Err(e) = p.order_rules(m)
    {
        eprintln!("ferryfs: {e}");
        return ExitCode::from(2);
    }
    match run(parsed, &raw) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ CliError::Refused(_)) => {
            eprintln!("ferryfs: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("ferryfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, raw: &[OsString]) -> Result<(), CliError> {
    let log_format = cli.log_format;
    match &cli.cmd {
        Cmd::Mount { .. } => {}
        Cmd::Status { .. } => cli::quiet_on_closed_stdout(),
        Cmd::Worker(_) => cli::init_logging("info", log_format),
        _ => cli::init_logging("warn", log_format),
    }
    match cli.cmd {
        Cmd::Prepare(p) => commands::prepare(&p),
        Cmd::Mount {
            state,
            mountpoint,
            foreground,
            no_copy,
            passthrough,
            metadata_ttl,
            limits,
            options,
            threads,
            metrics_addr,
            takeover,
            readdirplus,
            transport,
            selinux_absent,
            stage_max,
            workers_listen,
            workers_token_file,
            workers_tls_cert,
            workers_tls_key,
        } => {
            let args = MountArgs {
                stage_max,
                workers: workers_listen
                    .zip(workers_token_file)
                    .map(|(listen, token_file)| ferryfs::daemon::WorkersArgs {
                        listen,
                        token_file,
                        tls: workers_tls_cert.zip(workers_tls_key),
                    }),
                metrics_addr,
                takeover,
                readdirplus,
                transport,
                selinux_absent,
                state,
                mountpoint,
                options,
                threads,
                no_copy,
                passthrough,
                metadata_ttl: Duration::from_secs_f64(metadata_ttl),
                copier: limits.options()?,
            };
            commands::mount(&args, foreground, log_format, raw)
        }
        Cmd::Status { state, json, watch } => commands::status(&state, json, watch),
        Cmd::Execute(e) => commands::execute(&e),
        Cmd::Pause { state } => commands::daemon_only(&state, Request::Pause),
        Cmd::Resume { state } => commands::daemon_only(&state, Request::Resume),
        Cmd::Limits {
            state,
            bwlimit,
            ops_limit,
            workers,
        } => {
            let req = commands::limits_request(bwlimit.as_deref(), ops_limit, workers)?;
            commands::daemon_only(&state, req)
        }
        Cmd::Verify { state, checksum } => commands::verify(&state, checksum),
        Cmd::Commit { state, yes } => commands::commit(&state, yes),
        Cmd::Report {
            state,
            format,
            output,
        } => commands::report(&state, format, output.as_deref()),
        Cmd::Abort { state, keep_new } => commands::abort(&state, keep_new),
        Cmd::Resolve { state, paths } => commands::resolve(&state, &paths),
        Cmd::Unmount { mountpoint } => commands::unmount(&mountpoint),
        Cmd::Worker(w) => commands::worker(&w),
        Cmd::WorkersToken => commands::workers_token(),
    }
}
