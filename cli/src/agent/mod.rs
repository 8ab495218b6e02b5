//! Agent subcommands: `http`, `start`, `authtoken`.

use std::process::ExitCode;

use clap::Subcommand;

/// Subcommands that run tunnels.
#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Expose a local HTTP/WebSocket server.
    Http,
}

pub(crate) async fn run(cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentCommand::Http => anyhow::bail!("not implemented yet"),
    }
}
