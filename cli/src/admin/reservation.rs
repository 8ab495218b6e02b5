//! `burrow reservation create|list|release|transfer|policy`.

use clap::{Args, Subcommand};
use serde::Serialize;

use burrow_proto::v1::{
    ListReservationsRequest, ReleaseRequest, Reservation, ReserveRequest,
    SetReservationPolicyRequest, TransferRequest, TunnelPolicy,
};

use super::client::{Api, ApiArgs};
use super::output::{print_json, rfc3339, short_time, Output, Table};
use crate::policy::PolicyArgs;

/// `burrow reservation …`.
#[derive(Debug, Args)]
pub(crate) struct ReservationArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: ReservationCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ReservationCommand {
    /// Reserve a subdomain for a team: only its agents may bind it (owners and admins).
    #[command(after_help = "Examples:
  burrow reservation create chat --team web
  burrow reservation create Chat --team web      # names are case-folded: `chat`")]
    Create {
        /// One DNS label: 1–63 of a-z, 0-9 and '-', no leading or trailing hyphen.
        subdomain: String,
        /// Team name or id.
        #[arg(long, value_name = "TEAM")]
        team: String,
    },
    /// List your teams' reservations.
    #[command(after_help = "Examples:
  burrow reservation list
  burrow reservation list --team web --output json")]
    List {
        /// Only this team's reservations (name or id).
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
    },
    /// Release a reservation (owners and admins of its team).
    #[command(after_help = "Examples:
  burrow reservation release chat")]
    Release {
        /// The reserved subdomain.
        subdomain: String,
    },
    /// Move a reservation to another team (owner or admin of both).
    #[command(after_help = "Examples:
  burrow reservation transfer chat --to mobile")]
    Transfer {
        /// The reserved subdomain.
        subdomain: String,
        /// Name or id of the receiving team.
        #[arg(long = "to", value_name = "TEAM")]
        to_team: String,
    },
    /// Pin a policy on a reservation, show it, or clear it (owners and admins of its team).
    ///
    /// Every edge applies a pinned policy to the live tunnel at once, on top of whatever the
    /// agent asks for (`burrow http --basic-auth …`): visitors must pass both, so no agent can
    /// loosen it. Releasing or transferring the reservation drops its policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Replace the reservation's policy with the rules given here.
    #[command(after_help = "Examples:
  burrow reservation policy set chat --basic-auth-file reviewers.txt
  burrow reservation policy set chat --allow-ip 10.0.0.0/8 --allow-ip 2001:db8::/32 \\
      --deny-ip 10.9.0.0/16
  burrow reservation policy set chat --allow-origin https://app.example.com \\
      --request-header-add X-From:burrow --response-header-remove Server

Passwords are hashed (argon2id) on this machine; only the hashes are sent. A password given
with --basic-auth is visible to other users of this machine in the process list (`ps`);
--basic-auth-file FILE (lines `user:password`) keeps it out.")]
    Set {
        /// The reserved subdomain.
        subdomain: String,
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// Show the reservation's policy (password hashes are never shown).
    #[command(after_help = "Examples:
  burrow reservation policy show chat
  burrow reservation policy show chat --output json")]
    Show {
        /// The reserved subdomain.
        subdomain: String,
    },
    /// Remove the reservation's policy; the agent's own policy still applies.
    #[command(after_help = "Examples:
  burrow reservation policy clear chat")]
    Clear {
        /// The reserved subdomain.
        subdomain: String,
    },
}

/// A reservation as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct ReservationView {
    pub(crate) id: String,
    pub(crate) subdomain: String,
    pub(crate) team: String,
    pub(crate) created_by: String,
    pub(crate) created_at: Option<String>,
    /// The pinned policy; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) policy: Option<PolicyView>,
}

impl From<&Reservation> for ReservationView {
    fn from(r: &Reservation) -> Self {
        Self {
            id: r.id.clone(),
            subdomain: r.subdomain.clone(),
            team: r.team.clone(),
            created_by: r.created_by.clone(),
            created_at: rfc3339(r.created_at.as_ref()),
            policy: r.policy.as_ref().map(PolicyView::from),
        }
    }
}

/// A pinned policy as `--output json` shows it (user names only, never hashes).
#[derive(Debug, Default, Serialize)]
pub(crate) struct PolicyView {
    pub(crate) basic_auth_users: Vec<String>,
    pub(crate) allow_ips: Vec<String>,
    pub(crate) deny_ips: Vec<String>,
    pub(crate) allow_origins: Vec<String>,
    pub(crate) request_headers_add: Vec<HeaderView>,
    pub(crate) request_headers_remove: Vec<String>,
    pub(crate) response_headers_add: Vec<HeaderView>,
    pub(crate) response_headers_remove: Vec<String>,
}

/// One header rule.
#[derive(Debug, Serialize)]
pub(crate) struct HeaderView {
    pub(crate) name: String,
    pub(crate) value: String,
}

impl From<&TunnelPolicy> for PolicyView {
    fn from(p: &TunnelPolicy) -> Self {
        let headers = |list: &[burrow_proto::v1::Header]| {
            list.iter()
                .map(|h| HeaderView {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect()
        };
        Self {
            basic_auth_users: p.basic_auth.iter().map(|u| u.username.clone()).collect(),
            allow_ips: p.allow_ips.clone(),
            deny_ips: p.deny_ips.clone(),
            allow_origins: p.allow_origins.clone(),
            request_headers_add: headers(&p.request_headers_add),
            request_headers_remove: p.request_headers_remove.clone(),
            response_headers_add: headers(&p.response_headers_add),
            response_headers_remove: p.response_headers_remove.clone(),
        }
    }
}

/// One line per rule: `basic-auth  reviewer`, `allow-ip  10.0.0.0/8`, ….
fn policy_table(p: &PolicyView) -> Table {
    let mut t = Table::new(&["RULE", "VALUE"]);
    let mut add = |rule: &str, values: &[String]| {
        for v in values {
            t.row(vec![rule.to_owned(), v.clone()]);
        }
    };
    let pairs = |list: &[HeaderView]| -> Vec<String> {
        list.iter()
            .map(|h| format!("{}: {}", h.name, h.value))
            .collect()
    };
    add("basic-auth", &p.basic_auth_users);
    add("allow-ip", &p.allow_ips);
    add("deny-ip", &p.deny_ips);
    add("allow-origin", &p.allow_origins);
    add("request-header-add", &pairs(&p.request_headers_add));
    add("request-header-remove", &p.request_headers_remove);
    add("response-header-add", &pairs(&p.response_headers_add));
    add("response-header-remove", &p.response_headers_remove);
    t
}

/// A reservation's policy as the `policy` subcommands print it.
#[derive(Debug, Serialize)]
struct PinnedView {
    subdomain: String,
    team: String,
    /// `null` when no policy is pinned.
    policy: Option<PolicyView>,
}

fn show_policy(r: &Reservation, output: Output) -> anyhow::Result<()> {
    let view = PinnedView {
        subdomain: r.subdomain.clone(),
        team: r.team.clone(),
        policy: r.policy.as_ref().map(PolicyView::from),
    };
    match output {
        Output::Json => print_json(&view),
        Output::Table => match &view.policy {
            Some(p) => policy_table(p).print(),
            None => {
                outln!("No policy is pinned on {}.", view.subdomain)?;
                Ok(())
            }
        },
    }
}

async fn set_policy(
    api: &Api,
    subdomain: String,
    policy: Option<TunnelPolicy>,
) -> anyhow::Result<Reservation> {
    Ok(api
        .reservations()
        .set_reservation_policy(SetReservationPolicyRequest { subdomain, policy })
        .await
        .map_err(|s| api.error(s))?
        .into_inner())
}

async fn policy(api: &Api, command: PolicyCommand, output: Output) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Set { subdomain, policy } => {
            if policy.is_empty() {
                usage!(
                    "give at least one rule (--basic-auth-file, --allow-ip, …); to remove the \
                     policy use `burrow reservation policy clear {subdomain}`"
                );
            }
            // argon2id takes ~19 MiB and tens of milliseconds per user: off the async threads.
            let policy = tokio::task::spawn_blocking(move || policy.to_proto())
                .await
                .map_err(|e| anyhow::anyhow!("hashing the passwords failed: {e}"))??;
            let r = set_policy(api, subdomain, Some(policy)).await?;
            show_policy(&r, output)
        }
        PolicyCommand::Show { subdomain } => {
            let wanted = subdomain.trim().to_ascii_lowercase();
            let list = api
                .reservations()
                .list_reservations(ListReservationsRequest::default())
                .await
                .map_err(|s| api.error(s))?
                .into_inner()
                .reservations;
            let Some(r) = list.iter().find(|r| r.subdomain == wanted) else {
                anyhow::bail!("no reservation of {wanted:?} in your teams");
            };
            show_policy(r, output)
        }
        PolicyCommand::Clear { subdomain } => {
            let r = set_policy(api, subdomain, None).await?;
            show_policy(&r, output)
        }
    }
}

fn table(reservations: &[Reservation]) -> Table {
    let mut t = Table::new(&["SUBDOMAIN", "TEAM", "CREATED BY", "CREATED", "ID"]);
    for r in reservations {
        t.row(vec![
            r.subdomain.clone(),
            r.team.clone(),
            r.created_by.clone(),
            short_time(r.created_at.as_ref(), "-"),
            r.id.clone(),
        ]);
    }
    t
}

fn show(r: &Reservation, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&ReservationView::from(r)),
        Output::Table => table(std::slice::from_ref(r)).print(),
    }
}

pub(crate) async fn run(args: ReservationArgs) -> anyhow::Result<()> {
    let output = args.api.output;
    let api = super::connect(&args.api).await?;
    let mut client = api.reservations();
    match args.command {
        ReservationCommand::Create { subdomain, team } => {
            let r = client
                .reserve(ReserveRequest { team, subdomain })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show(&r, output)
        }
        ReservationCommand::List { team } => {
            let list = client
                .list_reservations(ListReservationsRequest {
                    team: team.unwrap_or_default(),
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner()
                .reservations;
            match output {
                Output::Json => {
                    print_json(&list.iter().map(ReservationView::from).collect::<Vec<_>>())
                }
                Output::Table => table(&list).print(),
            }
        }
        ReservationCommand::Release { subdomain } => {
            client
                .release(ReleaseRequest {
                    subdomain: subdomain.clone(),
                })
                .await
                .map_err(|s| api.error(s))?;
            match output {
                Output::Json => {
                    print_json(&serde_json::json!({ "subdomain": subdomain, "released": true }))
                }
                Output::Table => {
                    outln!("Released {subdomain}.")?;
                    Ok(())
                }
            }
        }
        ReservationCommand::Transfer { subdomain, to_team } => {
            let r = client
                .transfer(TransferRequest { subdomain, to_team })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show(&r, output)
        }
        ReservationCommand::Policy(command) => policy(&api, command, output).await,
    }
}
