//! The `gateway` binary: run the gateway, check a config file, check the machine, or
//! manage a password file.

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
    /// Add a user to a password file, or change its password (argon2id). The password is
    /// read from standard input (first line) unless --password is given.
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
        Some(Command::CheckConfig { file }) => match Config::load(&file).and_then(|c| {
            // Also read the password file and keys the auth providers need.
            gateway::auth::Authenticator::from_config(&c.auth, 1)
                .map(|_| c)
                .map_err(|message| gateway::config::ConfigError::Invalid {
                    key: String::new(),
                    message,
                })
        }) {
            Ok(c) => {
                // The TLS files are part of the config: a bad certificate fails here too.
                if c.mqtt.tls_listen.is_some() {
                    if let Err(e) = gateway::tls::server_config(&c.mqtt) {
                        eprintln!("config error: TLS: {e}");
                        return ExitCode::from(2);
                    }
                }
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Passwd {
            file,
            user,
            password,
        }) => passwd(&file, &user, password),
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

fn passwd(file: &std::path::Path, user: &str, password: Option<String>) -> ExitCode {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("cannot read the password from stdin: {e}");
                return ExitCode::from(2);
            }
            line.trim_end_matches(['\r', '\n']).to_string()
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
