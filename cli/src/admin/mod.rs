//! Admin subcommands: `login` and `account|team|token|reservation|tunnel …`.

use std::process::ExitCode;

use clap::Subcommand;

/// Subcommands that call the Burrow API.
#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Sign in and remember the API address and token.
    Login,
}

pub(crate) async fn run(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCommand::Login => anyhow::bail!("not implemented yet"),
    }
}
