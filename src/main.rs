//! The `gateway` binary: run the gateway, check a config file, check the machine, or
//! manage a password file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gateway::config::Config;
use gateway::server::{Server, EXIT_INVALID_CONFIG, EXIT_STORE_IN_USE};
use gateway::{doctor, logging};

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
    /// Run the gateway (the default). Exit 2 invalid config, 3 store in use, 1 other failure.
    Run,
    /// Validate a config file and exit (0 valid, 2 invalid).
    CheckConfig {
        /// The file to check (or --config FILE, as for the other commands).
        file: Option<PathBuf>,
    },
    /// Add a user to a password file, or change its password (argon2id). On a terminal
    /// the password is asked for twice without echo; otherwise it is read from standard
    /// input (first line) unless --password is given.
    Passwd {
        /// The password file ([auth.password_file] path); created if missing.
        file: PathBuf,
        /// The username.
        user: String,
        /// The password, for scripts (visible in the process list; prefer stdin).
        #[arg(long)]
        password: Option<String>,
    },
    /// Repair the durable store named by `[store] path` (redb's repair, an integrity check,
    /// a full read and a compaction), then exit (0 repaired or sound, 1 not repairable,
    /// 2 invalid config, 3 the store is in use by a running process).
    StoreRepair,
    /// Print the kernel and process limits that matter for many connections, and what to
    /// set. Exit 0 when nothing is LOW, 1 when something is.
    Doctor {
        /// Connections to size the recommendations for.
        #[arg(long, default_value_t = 1_000_000)]
        connections: u64,
    },
}

/// Exit code of a command-line usage error (sysexits.h EX_USAGE); 2 means an invalid config.
const EXIT_USAGE: u8 = 64;

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    let result = match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    };
    result.map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_INVALID_CONFIG)
    })
}

/// Parses the command line; usage errors exit 64, `--help` and `--version` exit 0.
fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}\n\nFor more information, try '--help'.");
    ExitCode::from(EXIT_USAGE)
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::CheckConfig { file }) => match (file, cli.config) {
            (Some(_), Some(_)) => usage_error("give the config file once (FILE or --config FILE)"),
            (None, None) => usage_error("check-config needs a config file: --config FILE"),
            (Some(f), None) | (None, Some(f)) => check_config(&f),
        },
        Some(Command::Passwd {
            file,
            user,
            password,
        }) => passwd(&file, &user, password),
        Some(Command::StoreRepair) => match load(cli.config.as_ref()) {
            Ok(config) => store_repair(&config),
            Err(code) => code,
        },
        Some(Command::Doctor { connections }) => {
            let (report, low) = doctor::report_and_low(connections);
            print!("{report}");
            if low {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Some(Command::Run) | None => match load(cli.config.as_ref()) {
            Ok(config) => run(config, cli.config.clone()),
            Err(code) => code,
        },
    }
}

/// `gateway check-config`: the config, then the files it names (as the start checks them).
fn check_config(file: &std::path::Path) -> ExitCode {
    let config = match load(Some(&file.to_path_buf())) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match gateway::server::load_config_files(&config) {
        Ok(_) => {
            println!("{}: OK", file.display());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(EXIT_INVALID_CONFIG)
        }
    }
}

/// `gateway store-repair`: 0 sound or repaired, 1 not repairable, 3 held by a process.
fn store_repair(config: &Config) -> ExitCode {
    match gateway::store::repair(&config.store) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(if e.in_use() { EXIT_STORE_IN_USE } else { 1 })
        }
    }
}

fn passwd(file: &std::path::Path, user: &str, password: Option<String>) -> ExitCode {
    let password = match password.map_or_else(gateway::prompt::new_password, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match gateway::auth::password::set_password(file, user, password.as_bytes()) {
        Ok(()) => {
            println!("{}: password set for {user}", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn run(config: Config, path: Option<PathBuf>) -> ExitCode {
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
    let server = match Server::start_from(config, path, Some(&log)) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cannot start: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    server.wait_for_signal();
    server.shutdown();
    ExitCode::SUCCESS
}
