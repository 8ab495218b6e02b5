//! `burrow account create|get|list|disable|set-password`.

use clap::{Args, Subcommand};
use serde::Serialize;

use burrow_proto::v1::{
    Account, CreateAccountRequest, DisableAccountRequest, GetAccountRequest, ListAccountsRequest,
    SetPasswordRequest,
};

use super::client::ApiArgs;
use super::output::{or_dash, print_json, rfc3339, short_time, yes_no, Output, Table};
use super::prompt;

/// `burrow account …`.
#[derive(Debug, Args)]
pub(crate) struct AccountArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: AccountCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AccountCommand {
    /// Create an account (platform admins only).
    #[command(after_help = "Examples:
  burrow account create alice@example.com --name 'Alice Liddell' --prompt-password
  printf '%s\\n' \"$PW\" | burrow account create ci@example.com --password-stdin
  burrow account create ops@example.com --platform-admin --prompt-password")]
    Create {
        /// Email address; it is how the person logs in (case-insensitive, unique).
        email: String,
        /// Display name.
        #[arg(long, value_name = "NAME", default_value = "")]
        name: String,
        /// Set a password, asked for twice on the terminal without echo.
        #[arg(long, conflicts_with = "password_stdin")]
        prompt_password: bool,
        /// Set a password, read from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Make the account a platform admin (may do anything on this control plane).
        #[arg(long)]
        platform_admin: bool,
    },
    /// Show one account (yours when ACCOUNT is omitted).
    #[command(after_help = "Examples:
  burrow account get
  burrow account get alice@example.com
  burrow account get alice@example.com --output json | jq -r .id")]
    Get {
        /// Account id (UUID) or email; yours when omitted.
        account: Option<String>,
    },
    /// List the accounts you can see (all of them for a platform admin).
    #[command(after_help = "Examples:
  burrow account list
  burrow account list --output json | jq -r '.[].email'")]
    List,
    /// Disable an account: its tokens stop working at once (platform admins only).
    #[command(after_help = "Examples:
  burrow account disable mallory@example.com")]
    Disable {
        /// Account id (UUID) or email.
        account: String,
    },
    /// Set a password: yours, or anyone's for a platform admin.
    #[command(after_help = "Examples:
  burrow account set-password                       # asks twice, no echo
  burrow account set-password alice@example.com
  printf '%s\\n' \"$PW\" | burrow account set-password ci@example.com --password-stdin")]
    SetPassword {
        /// Account id (UUID) or email; yours when omitted.
        account: Option<String>,
        /// Read the password from the first line of standard input instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
}

/// An account as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct AccountView {
    pub(crate) id: String,
    pub(crate) email: String,
    pub(crate) display_name: String,
    pub(crate) platform_admin: bool,
    pub(crate) disabled: bool,
    pub(crate) has_password: bool,
    pub(crate) created_at: Option<String>,
}

impl From<&Account> for AccountView {
    fn from(a: &Account) -> Self {
        Self {
            id: a.id.clone(),
            email: a.email.clone(),
            display_name: a.display_name.clone(),
            platform_admin: a.platform_admin,
            disabled: a.disabled,
            has_password: a.has_password,
            created_at: rfc3339(a.created_at.as_ref()),
        }
    }
}

fn table(accounts: &[Account]) -> Table {
    let mut t = Table::new(&[
        "ID", "EMAIL", "NAME", "ADMIN", "DISABLED", "PASSWORD", "CREATED",
    ]);
    for a in accounts {
        t.row(vec![
            a.id.clone(),
            a.email.clone(),
            or_dash(&a.display_name),
            yes_no(a.platform_admin),
            yes_no(a.disabled),
            yes_no(a.has_password),
            short_time(a.created_at.as_ref(), "-"),
        ]);
    }
    t
}

fn show(account: &Account, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&AccountView::from(account)),
        Output::Table => table(std::slice::from_ref(account)).print(),
    }
}

pub(crate) async fn run(args: AccountArgs) -> anyhow::Result<()> {
    let output = args.api.output;
    // Passwords are read before connecting so a prompt is not raced by a timeout.
    let password = match &args.command {
        AccountCommand::Create {
            prompt_password,
            password_stdin,
            ..
        } => {
            if *password_stdin {
                prompt::password_from_stdin()?
            } else if *prompt_password {
                prompt::new_password_from_terminal()?
            } else {
                String::new()
            }
        }
        AccountCommand::SetPassword { password_stdin, .. } => {
            if *password_stdin {
                prompt::password_from_stdin()?
            } else {
                prompt::new_password_from_terminal()?
            }
        }
        _ => String::new(),
    };
    let api = super::connect(&args.api).await?;
    let mut client = api.accounts();
    match args.command {
        AccountCommand::Create {
            email,
            name,
            platform_admin,
            ..
        } => {
            let account = client
                .create_account(CreateAccountRequest {
                    email,
                    display_name: name,
                    password,
                    platform_admin,
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show(&account, output)
        }
        AccountCommand::Get { account } => {
            let account = client
                .get_account(GetAccountRequest {
                    account: account.unwrap_or_default(),
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show(&account, output)
        }
        AccountCommand::List => {
            let accounts = client
                .list_accounts(ListAccountsRequest {})
                .await
                .map_err(|s| api.error(s))?
                .into_inner()
                .accounts;
            match output {
                Output::Json => {
                    print_json(&accounts.iter().map(AccountView::from).collect::<Vec<_>>())
                }
                Output::Table => table(&accounts).print(),
            }
        }
        AccountCommand::Disable { account } => {
            let account = client
                .disable_account(DisableAccountRequest { account })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show(&account, output)
        }
        AccountCommand::SetPassword { account, .. } => {
            let who = account.clone().unwrap_or_default();
            client
                .set_password(SetPasswordRequest {
                    account: who.clone(),
                    password,
                })
                .await
                .map_err(|s| api.error(s))?;
            match output {
                Output::Json => print_json(&serde_json::json!({ "password_set": true })),
                Output::Table => {
                    if who.is_empty() {
                        outln!("Your password was changed.")?;
                    } else {
                        outln!("The password of {who} was changed.")?;
                    }
                    Ok(())
                }
            }
        }
    }
}
