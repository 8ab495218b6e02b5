//! `burrow token create|list|revoke|rotate`.
//!
//! A token's secret is shown exactly once, by `create` and `rotate`; the API keeps only a hash
//! of it, so `list` never has one to show.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use burrow_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, RevokeTokenRequest,
    RotateTokenRequest, Token, TokenKind,
};

use super::client::ApiArgs;
use super::duration::parse_duration;
use super::output::{kind_name, or_dash, print_json, rfc3339, short_time, time, Output, Table};

/// Longest overlap `rotate` accepts, as the API does: seven days.
pub(crate) const MAX_ROTATE_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);

/// `burrow token …`.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: TokenCommand,
}

/// A token kind, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum KindArg {
    /// Runs agents (`burrow http …`) for one team (needs --team).
    Agent,
    /// Calls this API as you.
    Api,
    /// Identifies an edge worker (platform admins only).
    Edge,
}

impl From<KindArg> for TokenKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Agent => TokenKind::Agent,
            KindArg::Api => TokenKind::Api,
            KindArg::Edge => TokenKind::Edge,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token and print its secret once.
    #[command(after_help = "Examples:
  burrow token create laptop --team web                     # an agent token
  burrow token create previews --team web --scope 'pr-*' --expires-in 30d
  burrow token create ci --kind api --expires-in 90d
  burrow token create edge-1 --kind edge                     # platform admins only
  burrow token create laptop --team web --output json | jq -r .secret > agent.token

The secret is printed once: store it now (a password manager, or a file only you can read).")]
    Create {
        /// A name you will recognise in `burrow token list` (1–100 characters).
        name: String,
        /// What the token is for.
        #[arg(long, value_enum, default_value_t = KindArg::Agent)]
        kind: KindArg,
        /// Team name or id; required for agent tokens, refused for others.
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
        /// Lifetime, e.g. 12h, 30d, 2w (no expiry when omitted).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<Duration>,
        /// Agent tokens: a subdomain pattern the token may bind (`chat`, `pr-*`); repeat for
        /// more. Any of the team's subdomains when omitted.
        #[arg(long = "scope", value_name = "PATTERN")]
        scopes: Vec<String>,
    },
    /// List tokens (never their secrets): yours and those of teams you administer.
    #[command(after_help = "Examples:
  burrow token list
  burrow token list --team web --all
  burrow token list --output json | jq -r '.[] | select(.kind == \"agent\") | .id'")]
    List {
        /// Only this team's tokens (name or id).
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token at once: its next use is refused and edges drop its tunnels.
    #[command(after_help = "Examples:
  burrow token revoke he8q0u444ndv
  burrow token list --output json | jq -r '.[] | select(.name == \"laptop\") | .id' \\
    | xargs -n1 burrow token revoke")]
    Revoke {
        /// Token id (the ID column of `burrow token list`).
        id: String,
    },
    /// Issue a new secret for a token; the old one works for --overlap, then is refused.
    #[command(after_help = "Examples:
  burrow token rotate he8q0u444ndv                 # old secret refused at once
  burrow token rotate he8q0u444ndv --overlap 1h    # old secret valid one more hour")]
    Rotate {
        /// Token id.
        id: String,
        /// How long the previous secret keeps working (at most 7d; refused at once when
        /// omitted).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        overlap: Option<Duration>,
    },
}

/// A token as `--output json` shows it (never its secret).
#[derive(Debug, Serialize)]
pub(crate) struct TokenView {
    pub(crate) id: String,
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    /// Team name for agent tokens; null otherwise.
    pub(crate) team: Option<String>,
    pub(crate) created_by: String,
    pub(crate) scopes: Vec<String>,
    /// The public start of the token text, to recognise it.
    pub(crate) prefix: String,
    /// `active`, `revoked` or `expired`.
    pub(crate) status: &'static str,
    pub(crate) created_at: Option<String>,
    pub(crate) expires_at: Option<String>,
    pub(crate) last_used_at: Option<String>,
    pub(crate) revoked_at: Option<String>,
}

/// A new secret as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct SecretView {
    pub(crate) token: TokenView,
    /// The whole token text. Shown once.
    pub(crate) secret: String,
}

fn status(t: &Token) -> &'static str {
    if time(t.revoked_at.as_ref()).is_some() {
        "revoked"
    } else if time(t.expires_at.as_ref()).is_some_and(|e| e <= chrono::Utc::now()) {
        "expired"
    } else {
        "active"
    }
}

impl From<&Token> for TokenView {
    fn from(t: &Token) -> Self {
        Self {
            id: t.id.clone(),
            kind: kind_name(t.kind),
            name: t.name.clone(),
            team: Some(t.team.clone()).filter(|s| !s.is_empty()),
            created_by: t.created_by.clone(),
            scopes: t.scopes.clone(),
            prefix: t.prefix.clone(),
            status: status(t),
            created_at: rfc3339(t.created_at.as_ref()),
            expires_at: rfc3339(t.expires_at.as_ref()),
            last_used_at: rfc3339(t.last_used_at.as_ref()),
            revoked_at: rfc3339(t.revoked_at.as_ref()),
        }
    }
}

fn table(tokens: &[Token]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "KIND",
        "NAME",
        "TEAM",
        "SCOPES",
        "STATUS",
        "CREATED",
        "LAST USED",
        "EXPIRES",
    ]);
    for tok in tokens {
        t.row(vec![
            tok.id.clone(),
            kind_name(tok.kind).to_owned(),
            tok.name.clone(),
            or_dash(&tok.team),
            if tok.scopes.is_empty() {
                "*".to_owned()
            } else {
                tok.scopes.join(",")
            },
            status(tok).to_owned(),
            short_time(tok.created_at.as_ref(), "-"),
            short_time(tok.last_used_at.as_ref(), "never"),
            short_time(tok.expires_at.as_ref(), "never"),
        ]);
    }
    t
}

/// Shows a newly issued secret: the only time it is ever printed.
fn show_secret(created: CreateTokenResponse, output: Output) -> anyhow::Result<()> {
    let token = created
        .token
        .ok_or_else(|| anyhow::anyhow!("the API answered without the token's details"))?;
    anyhow::ensure!(
        !created.secret.is_empty(),
        "the API answered without the token's secret"
    );
    match output {
        Output::Json => print_json(&SecretView {
            token: TokenView::from(&token),
            secret: created.secret,
        }),
        Output::Table => {
            table(std::slice::from_ref(&token)).print()?;
            outln!()?;
            outln!("{}", created.secret)?;
            eprintln!();
            eprintln!(
                "Store this token now: it is shown only this once and cannot be shown again."
            );
            Ok(())
        }
    }
}

pub(crate) async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let output = args.api.output;
    if let TokenCommand::Create { kind, team, .. } = &args.command {
        match (kind, team) {
            (KindArg::Agent, None) => usage!(
                "agent tokens belong to a team: pass --team TEAM (or --kind api for an API token)"
            ),
            (KindArg::Api | KindArg::Edge, Some(_)) => {
                usage!("--team is only for agent tokens")
            }
            _ => {}
        }
    }
    if let TokenCommand::Rotate {
        overlap: Some(o), ..
    } = &args.command
    {
        if *o > MAX_ROTATE_OVERLAP {
            usage!("--overlap is at most 7d, not {}s", o.as_secs());
        }
    }
    let api = super::connect(&args.api).await?;
    let mut client = api.tokens();
    match args.command {
        TokenCommand::Create {
            name,
            kind,
            team,
            expires_in,
            scopes,
        } => {
            let created = client
                .create_token(CreateTokenRequest {
                    kind: TokenKind::from(kind).into(),
                    name,
                    team: team.unwrap_or_default(),
                    expires_in_seconds: expires_in.map_or(0, |d| d.as_secs()),
                    scopes,
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show_secret(created, output)
        }
        TokenCommand::List { team, all } => {
            let tokens = client
                .list_tokens(ListTokensRequest {
                    team: team.unwrap_or_default(),
                    include_inactive: all,
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner()
                .tokens;
            match output {
                Output::Json => print_json(&tokens.iter().map(TokenView::from).collect::<Vec<_>>()),
                Output::Table => table(&tokens).print(),
            }
        }
        TokenCommand::Revoke { id } => {
            let token = client
                .revoke_token(RevokeTokenRequest { id })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            match output {
                Output::Json => print_json(&TokenView::from(&token)),
                Output::Table => table(std::slice::from_ref(&token)).print(),
            }
        }
        TokenCommand::Rotate { id, overlap } => {
            let created = client
                .rotate_token(RotateTokenRequest {
                    id,
                    overlap_seconds: overlap.map_or(0, |d| d.as_secs()),
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show_secret(created, output)
        }
    }
}
