//! `burrow`: the tunnel agent (`burrow http 3000`) and the admin client of the Burrow API
//! (`burrow account|team|token|reservation|tunnel …`).
//!
//! # Layout
//! - `config`: the user's config file (`~/.config/burrow/config.toml`, mode 0600).
//! - `admin`: `login` and the admin subcommands that call the gRPC API.
//! - `agent`: `http`, `start` and `authtoken`: the agent that serves tunnels.
//! - `policy`: the tunnel-policy flags shared by `burrow http` and `burrow reservation policy`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod agent;
mod config;
mod inspect;
mod policy;

/// Burrow: expose a local HTTP or WebSocket server at a public URL.
///
/// Examples:
///   burrow http 3000 --subdomain chat      # https://chat.<domain> → localhost:3000
///   burrow login --api https://api.example.com --email me@example.com
///   burrow reservation create chat --team web
#[derive(Debug, Parser)]
#[command(name = "burrow", version, about, long_about = None, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Agent(Box<agent::AgentCommand>),
    #[command(flatten)]
    Admin(admin::AdminCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent serves its extra lanes on worker threads of its own (`--worker-threads`); the
    // runtime here drives the first connection, on this thread alone, as each worker thread
    // drives its lanes (a multi-threaded scheduler's bookkeeping, even with one worker, cost
    // the first lane's messages about 7 % more instructions: BENCHMARKS.md).
    let mut builder = if matches!(&cli.command, Command::Agent(a) if a.own_threads()) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Agent(cmd) => agent::run(*cmd).await,
            Command::Admin(cmd) => admin::run(cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
