//! Admin subcommands: `login`, `logout`, `whoami`, `usage` and
//! `account|team|token|reservation|tunnel …`, thin clients of the Burrow gRPC API.
//!
//! # Layout
//! - `client`: API address and token resolution, the connection, and the one place where gRPC
//!   statuses become sentences.
//! - `output`: aligned tables and JSON.
//! - `prompt`: passwords from the terminal (no echo) or standard input.
//! - `duration`: `30d`-style durations.
//! - `session`: `login`, `logout`, `whoami`.
//! - `account`, `team`, `token`, `reservation`, `tunnel`, `usage`: one module per API noun.
//!
//! Every command prints a table by default and JSON with `--output json`; a failure is one
//! line on standard error and exit status 1 (2 for command-line mistakes).

use std::process::ExitCode;

use clap::Subcommand;

/// `println!` that returns an error instead of panicking when standard output is closed
/// (`burrow tunnel watch | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))
    }};
}

/// Exit status for command-line mistakes, as clap uses for its own.
const EXIT_USAGE: u8 = 2;

/// A mistake on the command line that clap cannot see (a token given as an argument, an agent
/// token without `--team`, …): reported like clap's own, with exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// `bail!` for [`UsageError`]s.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::admin::UsageError(format!($($arg)*))))
    };
}

mod account;
mod client;
mod duration;
mod output;
mod prompt;
mod reservation;
mod session;
mod team;
mod token;
mod tunnel;
mod usage;

use client::{Api, ApiArgs, ENV_TOKEN};

/// Subcommands that call the Burrow API.
#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Sign in and save the API address and a new API token (mode 0600).
    #[command(after_help = "Examples:
  burrow login --api http://127.0.0.1:7070 --email admin@example.com    # asks for the password
  printf '%s\\n' \"$PW\" | burrow login --email ci@example.com --password-stdin
  burrow-control bootstrap --email admin@example.com > admin.token
  burrow login --api http://127.0.0.1:7070 --token-file admin.token     # save a given token

The config file is $BURROW_CONFIG, else $XDG_CONFIG_HOME/burrow/config.toml, else
~/.config/burrow/config.toml.")]
    Login(Box<session::LoginArgs>),
    /// Revoke the saved API token and forget it.
    #[command(after_help = "Examples:
  burrow logout
  burrow logout --keep-token     # forget it locally only")]
    Logout(Box<session::LogoutArgs>),
    /// Show who you are signed in as, and your teams.
    #[command(after_help = "Examples:
  burrow whoami
  BURROW_TOKEN=\"$(cat ci.token)\" burrow whoami --output json")]
    Whoami(Box<session::WhoamiArgs>),
    /// Manage accounts (create and disable: platform admins).
    #[command(after_help = "Examples:
  burrow account create alice@example.com --prompt-password
  burrow account list
  burrow account disable mallory@example.com")]
    Account(Box<account::AccountArgs>),
    /// Manage teams and their members.
    #[command(after_help = "Examples:
  burrow team create web
  burrow team add-member web alice@example.com --role admin
  burrow team get web
  burrow team limits web --max-websockets 500")]
    Team(Box<team::TeamArgs>),
    /// Manage agent, API and edge tokens (secrets are shown once).
    #[command(after_help = "Examples:
  burrow token create laptop --team web --expires-in 30d
  burrow token list
  burrow token revoke TOKEN_ID")]
    Token(Box<token::TokenArgs>),
    /// Reserve subdomains for a team.
    #[command(after_help = "Examples:
  burrow reservation create chat --team web
  burrow reservation list
  burrow reservation transfer chat --to mobile
  burrow reservation policy set chat --basic-auth-file reviewers.txt --allow-ip 10.0.0.0/8")]
    Reservation(Box<reservation::ReservationArgs>),
    /// Inspect and end live tunnels.
    #[command(after_help = "Examples:
  burrow tunnel list
  burrow tunnel watch
  burrow tunnel kill chat")]
    Tunnel(Box<tunnel::TunnelArgs>),
    /// Show metered use per team and UTC day: bytes, connections, WebSocket messages.
    #[command(after_help = "Examples:
  burrow usage
  burrow usage --team web --from 2026-01-01 --to 2026-01-31
  burrow usage --team web --json")]
    Usage(Box<usage::UsageArgs>),
}

/// Runs one admin command. Errors come back as one sentence for `main` to print; usage
/// mistakes are printed here and exit with status 2.
pub(crate) async fn run(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    match dispatch(cmd).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => match e.downcast_ref::<UsageError>() {
            Some(usage) => {
                eprintln!("error: {usage}");
                Ok(ExitCode::from(EXIT_USAGE))
            }
            None => Err(e),
        },
    }
}

async fn dispatch(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Login(args) => session::login(*args).await?,
        AdminCommand::Logout(args) => session::logout(*args).await?,
        AdminCommand::Whoami(args) => session::whoami(*args).await?,
        AdminCommand::Account(args) => account::run(*args).await?,
        AdminCommand::Team(args) => team::run(*args).await?,
        AdminCommand::Token(args) => token::run(*args).await?,
        AdminCommand::Reservation(args) => reservation::run(*args).await?,
        AdminCommand::Tunnel(args) => tunnel::run(*args).await?,
        AdminCommand::Usage(args) => usage::run(*args).await?,
    }
    Ok(())
}

/// Resolves address and token, refuses early without a token, and connects.
async fn connect(args: &ApiArgs) -> anyhow::Result<Api> {
    args.check()?;
    let saved = crate::config::load()?;
    let address = args.api_address(&saved)?;
    let credential = args.credential(&address, std::env::var(ENV_TOKEN).ok(), &saved)?;
    anyhow::ensure!(
        credential.is_some(),
        "not logged in to {address}: run `burrow login`, set {ENV_TOKEN}, or pass --token-file FILE"
    );
    Api::connect(&address, credential.as_ref(), args).await
}
