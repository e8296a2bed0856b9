//! The `bearer-proxy` binary: parses the command line, loads the config,
//! installs logging and hands over to the library. Exit codes: 0 normal end,
//! 64 invalid configuration, 2 command-line syntax (clap), 1 anything else.

use std::process::ExitCode;

use bearer_proxy::config::{self, Flags, ProcessEnv};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bearer-proxy",
    version,
    about = "A local authenticating reverse proxy for OAuth2-protected APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
}

const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::Config::load(&cli.flags, &ProcessEnv) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("bearer-proxy: invalid configuration: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    bearer_proxy::telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bearer-proxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let Command::Run = cli.command.unwrap_or(Command::Run);
        let shutdown = bearer_proxy::shutdown::on_signal().map_err(|e| e.to_string())?;
        let listeners = bearer_proxy::Listeners::bind(&config)
            .await
            .map_err(|e| e.to_string())?;
        bearer_proxy::run(config, listeners, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bearer-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}
