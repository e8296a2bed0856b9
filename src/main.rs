//! The `bearer-proxy` binary: parses the command line, loads the config,
//! installs logging and hands over to the library. Exit codes: 0 normal end
//! (or a passing check), 64 invalid configuration, 2 command-line syntax
//! (clap), 1 anything else (a failed check or health check).

use std::process::ExitCode;

use bearer_proxy::config::{self, ConfigError, Flags, ProcessEnv};
use bearer_proxy::{check, healthcheck, telemetry};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Fetch one token, call the upstream's status path, and report.
    Check {
        /// The report as one JSON object (no secret, no token).
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if the admin /healthz answers 200, else 1 (for HEALTHCHECK).
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    // This runtime accepts connections and runs the token refresher and the
    // admin listener; proxied connections are served by `proxy.workers`
    // threads of their own.
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("bearer-proxy: cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    if command == Command::Healthcheck {
        let admin = match config::admin_listen(&cli.flags, &ProcessEnv) {
            Ok(admin) => admin,
            Err(error) => return config_error(&error),
        };
        return exit(runtime.block_on(healthcheck::run(admin, healthcheck::TIMEOUT)));
    }
    let config = match config::Config::load(&cli.flags, &ProcessEnv) {
        Ok(config) => config,
        Err(error) => return config_error(&error),
    };
    if let Command::Check { json } = command {
        let report = runtime.block_on(check::run(&config));
        if json {
            print!("{}", report.json());
        } else {
            print!("{}", report.text());
        }
        return if report.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let log = telemetry::init(config.log_format);
    let result = runtime
        .block_on(bearer_proxy::run_until_signal(config))
        .map_err(|e| e.to_string());
    // What is queued is written before the last words.
    drop(log);
    exit(result)
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bearer-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(error: &ConfigError) -> ExitCode {
    eprintln!("bearer-proxy: invalid configuration: {error}");
    ExitCode::from(64)
}
