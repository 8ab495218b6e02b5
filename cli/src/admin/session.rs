//! `burrow login`, `burrow logout` and `burrow whoami`: the saved API address and token.

use clap::Args;
use serde::Serialize;

use burrow_proto::v1::{
    GetAccountRequest, ListTeamsRequest, ListTokensRequest, LoginRequest, RevokeTokenRequest,
};

use super::account::AccountView;
use super::client::{Api, ApiArgs, Credential, TokenSource, ENV_TOKEN};
use super::output::{print_json, role_name, yes_no, Output};
use super::prompt;
use crate::config;

/// `burrow login`.
#[derive(Debug, Args)]
pub(crate) struct LoginArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Your email address (asked for when omitted).
    #[arg(long, value_name = "EMAIL")]
    pub(crate) email: Option<String>,
    /// Read the password from the first line of standard input instead of the terminal.
    #[arg(long)]
    pub(crate) password_stdin: bool,
}

/// Start of the name of every token `burrow login` creates; `burrow logout` revokes only
/// those, so a token saved with `login --token-file` (say, the bootstrap admin's only one)
/// is forgotten locally but stays valid.
const LOGIN_TOKEN_NAME: &str = "burrow login";

/// `burrow logout`.
#[derive(Debug, Args)]
pub(crate) struct LogoutArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Only forget the token locally; do not revoke it on the API. (Tokens not created by
    /// `burrow login`, e.g. saved with `login --token-file`, are never revoked by logout.)
    #[arg(long)]
    pub(crate) keep_token: bool,
}

/// `burrow whoami`.
#[derive(Debug, Args)]
pub(crate) struct WhoamiArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// What `burrow login --output json` prints (never the token).
#[derive(Debug, Serialize)]
struct LoginView {
    api: String,
    account: AccountView,
    token_id: Option<String>,
    config_path: String,
}

/// What `burrow whoami --output json` prints.
#[derive(Debug, Serialize)]
struct WhoamiView {
    api: String,
    /// Where the token came from: `--token-file`, `BURROW_TOKEN` or `config file`.
    token_source: &'static str,
    account: AccountView,
    teams: Vec<TeamRoleView>,
}

#[derive(Debug, Serialize)]
struct TeamRoleView {
    name: String,
    role: &'static str,
}

/// The host name, to name the token a login creates.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown host".to_owned())
}

/// Signs in with email and password (or checks a given token) and saves API and token.
pub(crate) async fn login(args: LoginArgs) -> anyhow::Result<()> {
    args.api.check()?;
    let output = args.api.output;
    let mut saved = config::load()?;
    let address = args.api.api_address(&saved)?;

    // A token given by file or BURROW_TOKEN (e.g. the one `burrow-control bootstrap`
    // printed) is checked and saved as is; otherwise email and password buy a new one.
    // Asking for a password login (`--email`, `--password-stdin`) ignores BURROW_TOKEN.
    let wants_password = args.email.is_some() || args.password_stdin;
    if wants_password && args.api.token_file.is_some() {
        usage!("--token-file saves a given token; it cannot be combined with --email or --password-stdin");
    }
    let given = match &args.api.token_file {
        Some(path) => Some(Credential::new(
            config::read_token_file(path)?,
            TokenSource::File,
        )),
        None if wants_password => None,
        None => std::env::var(ENV_TOKEN)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(|t| Credential::new(t, TokenSource::Env)),
    };
    let (account, token, token_id) = match given {
        Some(credential) => {
            let api = Api::connect(&address, Some(&credential), &args.api).await?;
            let account = api
                .accounts()
                .get_account(GetAccountRequest::default())
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            (account, credential.secret().to_owned(), None)
        }
        None => {
            let email = match args.email {
                Some(e) => e,
                None => prompt::email_from_terminal()?,
            };
            let password = if args.password_stdin {
                prompt::password_from_stdin()?
            } else {
                prompt::password_from_terminal(&format!("Password for {email}: "))?
            };
            let api = Api::connect(&address, None, &args.api).await?;
            let response = api
                .accounts()
                .login(LoginRequest {
                    email: email.clone(),
                    password,
                    token_name: format!("{LOGIN_TOKEN_NAME} on {}", host_name()),
                })
                .await
                .map_err(|s| {
                    if s.code() == tonic::Code::Unauthenticated {
                        anyhow::anyhow!(
                            "login refused: wrong email or password, or the account is disabled"
                        )
                    } else {
                        api.error(s)
                    }
                })?
                .into_inner();
            let account = response
                .account
                .ok_or_else(|| anyhow::anyhow!("the API answered without the account"))?;
            anyhow::ensure!(
                !response.token.is_empty(),
                "the API answered without a token"
            );
            (account, response.token, Some(response.token_id))
        }
    };
    saved.api = Some(address.clone());
    saved.token = Some(token);
    let path = config::save(&saved)?;
    match output {
        Output::Json => print_json(&LoginView {
            api: address,
            account: AccountView::from(&account),
            token_id,
            config_path: path.display().to_string(),
        }),
        Output::Table => {
            outln!(
                "Logged in to {address} as {}. Saved to {} (mode 0600).",
                account.email,
                path.display()
            )?;
            Ok(())
        }
    }
}

/// Forgets the saved token, revoking it on the API first (best effort).
pub(crate) async fn logout(args: LogoutArgs) -> anyhow::Result<()> {
    args.api.check()?;
    let output = args.api.output;
    let mut saved = config::load()?;
    let Some(token) = saved.token.clone() else {
        match output {
            Output::Json => print_json(&serde_json::json!({ "logged_out": false }))?,
            Output::Table => outln!("Not logged in.")?,
        }
        return Ok(());
    };
    let mut revoked = Revoked::No;
    let mut warning = None;
    if !args.keep_token {
        match revoke_own(&args.api, &saved, token).await {
            Ok(r) => revoked = r,
            Err(e) => warning = Some(format!("{e:#}")),
        }
    }
    if let Revoked::NotFromLogin(id) = &revoked {
        eprintln!(
            "note: the saved token was not created by `burrow login`, so it stays valid \
             (revoke it with `burrow token revoke {id}`)"
        );
    }
    let revoked = revoked == Revoked::Yes;
    saved.token = None;
    let path = config::save(&saved)?;
    if let Some(w) = &warning {
        eprintln!("warning: the token was not revoked on the API: {w}");
    }
    match output {
        Output::Json => print_json(&serde_json::json!({
            "logged_out": true,
            "revoked": revoked,
            "config_path": path.display().to_string(),
        })),
        Output::Table => {
            if revoked {
                outln!("Logged out; the token was revoked.")?;
            } else {
                outln!("Logged out; the token was removed from {}.", path.display())?;
            }
            Ok(())
        }
    }
}

/// What `logout` did with the saved token on the API.
#[derive(Debug, PartialEq, Eq)]
enum Revoked {
    Yes,
    /// Not found among the caller's active tokens (already revoked or expired).
    No,
    /// Not created by `burrow login`; left valid. Carries its id.
    NotFromLogin(String),
}

/// Revokes the saved token if `burrow login` created it: finds it by its public prefix among
/// the caller's tokens.
async fn revoke_own(
    args: &ApiArgs,
    saved: &config::UserConfig,
    token: String,
) -> anyhow::Result<Revoked> {
    let address = args.api_address(saved)?;
    let saved_api = saved.api.as_deref().map(super::client::normalize_api);
    anyhow::ensure!(
        matches!(saved_api, Some(Ok(ref a)) if *a == address),
        "the saved token belongs to another API than {address}"
    );
    let credential = Credential::new(token.clone(), TokenSource::Config);
    let api = Api::connect(&address, Some(&credential), args).await?;
    let tokens = api
        .tokens()
        .list_tokens(ListTokensRequest::default())
        .await
        .map_err(|s| api.error(s))?
        .into_inner()
        .tokens;
    let Some(own) = tokens
        .iter()
        .find(|t| !t.prefix.is_empty() && token.starts_with(&t.prefix))
    else {
        return Ok(Revoked::No);
    };
    if !own.name.starts_with(LOGIN_TOKEN_NAME) {
        return Ok(Revoked::NotFromLogin(own.id.clone()));
    }
    api.tokens()
        .revoke_token(RevokeTokenRequest { id: own.id.clone() })
        .await
        .map_err(|s| api.error(s))?;
    Ok(Revoked::Yes)
}

/// Shows who the token in force belongs to and their teams.
pub(crate) async fn whoami(args: WhoamiArgs) -> anyhow::Result<()> {
    let output = args.api.output;
    let api = super::connect(&args.api).await?;
    let account = api
        .accounts()
        .get_account(GetAccountRequest::default())
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    let teams = api
        .teams()
        .list_teams(ListTeamsRequest { all: false })
        .await
        .map_err(|s| api.error(s))?
        .into_inner()
        .teams;
    let source = api.token_source.map_or("none", TokenSource::describe);
    match output {
        Output::Json => print_json(&WhoamiView {
            api: api.address.clone(),
            token_source: source,
            account: AccountView::from(&account),
            teams: teams
                .iter()
                .map(|t| TeamRoleView {
                    name: t.name.clone(),
                    role: role_name(t.my_role),
                })
                .collect(),
        }),
        Output::Table => {
            outln!("API:            {}", api.address)?;
            outln!("Token from:     {source}")?;
            outln!("Account:        {} ({})", account.email, account.id)?;
            outln!("Platform admin: {}", yes_no(account.platform_admin))?;
            let teams: Vec<String> = teams
                .iter()
                .map(|t| format!("{} ({})", t.name, role_name(t.my_role)))
                .collect();
            outln!(
                "Teams:          {}",
                if teams.is_empty() {
                    "none".to_owned()
                } else {
                    teams.join(", ")
                }
            )?;
            Ok(())
        }
    }
}
