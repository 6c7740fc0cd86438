//! The `gateway` binary: run the gateway, check a config file, or check the machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gateway::config::Config;
use gateway::{doctor, logging, server::Server};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "MQTT 3.1.1/5 and HTTP push gateway for a million devices"
)]
struct Cli {
    /// Config file (TOML). Keys not set keep the defaults of config/gateway.toml.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate a config file and exit (0 valid, 2 invalid).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Repair the durable store named by `[store] path` (redb's repair, an integrity check,
    /// a full read and a compaction), then exit (0 repaired or sound, 1 not repairable).
    StoreRepair,
    /// Print the kernel and process limits that matter for many connections, and what to set.
    Doctor {
        /// Connections to size the recommendations for.
        #[arg(long, default_value_t = 1_000_000)]
        connections: u64,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    let result = match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    };
    result.map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Some(Command::StoreRepair) => {
            let config = match load(cli.config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match gateway::store::repair(&config.store) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::Doctor { connections }) => {
            print!("{}", doctor::report(connections));
            ExitCode::SUCCESS
        }
        Some(Command::Run) | None => {
            let config = match load(cli.config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run(config)
        }
    }
}

fn run(config: Config) -> ExitCode {
    let log = logging::init(&config.log);
    match doctor::raise_nofile_limit() {
        Ok((before, after, hard)) => {
            tracing::info!(soft_before = before, soft = after, hard, "RLIMIT_NOFILE");
            if let Some(w) = doctor::fd_limit_warning(after, u64::from(config.mqtt.max_connections))
            {
                tracing::warn!("{w}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    if config.http.tokens.is_empty() {
        tracing::warn!("[http] tokens is empty: the /v1 API is open to anyone who reaches it");
    }
    let server = match Server::start(config, Some(&log)) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    server.wait_for_signal();
    server.shutdown();
    ExitCode::SUCCESS
}
