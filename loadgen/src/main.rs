//! loadgen: the tool that proves the gateway's numbers — a million idle connections,
//! pushes with end-to-end latency, fan-out, probe churn and reconnect storms — against
//! the gateway or any MQTT 3.1.1/5 broker.
//!
//! One binary, two roles. The parent (what a user runs) checks the machine's limits,
//! plans how many child processes the sockets need, re-executes itself with the hidden
//! `--child` flag for each, drives the scenario's phases and prints the summary. Each
//! child holds a slice of the connections on its own tokio runtime. Module map:
//!
//! | module | owns |
//! |---|---|
//! | `cli` | subcommands and options (also the children's work order) |
//! | `limits` | RLIMIT_NOFILE, ephemeral ports, source addresses, the process plan |
//! | `parent` | children, phases, aggregation, the summary of each scenario |
//! | `child`, `proto` | the child role and the JSON-lines protocol between the two |
//! | `fleet`, `ticker` | simulated devices and the shared clock that replaces their timers |
//! | `codec` | the client side of the MQTT wire format |
//! | `ws` | `--transport ws`: the client side of MQTT over WebSocket (upgrade, frames) |
//! | `pusher`, `publisher` | the HTTP push driver (`push`) and the MQTT publisher (`fanout`) |
//! | `stats`, `cost` | mergeable latency histograms; server RSS/CPU sampling |
//! | `report`, `plot` | progress bar, Markdown + JSON summary, SVG plot |

mod child;
mod cli;
mod codec;
mod cost;
mod fleet;
mod limits;
mod parent;
mod plot;
mod proto;
mod publisher;
mod pusher;
mod report;
mod stats;
mod ticker;
mod ws;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Some(order) = cli.child {
        return child::run(&order);
    }
    match cli.command {
        Some(cmd) => parent::run(cmd),
        None => {
            let _ = cli::Cli::command().print_help();
            ExitCode::from(2)
        }
    }
}
