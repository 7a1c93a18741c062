//! The `thaw` command: parse arguments, build a config, call the library.

mod attach;
mod bench;
mod cmd;
mod profile;
mod vm;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    let default_level = if matches!(cli.command, cmd::Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THAW_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!("{default_level},fuser::reply=off"))
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match cmd::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thaw: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
