//! `burrow reservation create|list|release|transfer`.

use clap::{Args, Subcommand};
use serde::Serialize;

use burrow_proto::v1::{
    ListReservationsRequest, ReleaseRequest, Reservation, ReserveRequest, TransferRequest,
};

use super::client::ApiArgs;
use super::output::{print_json, rfc3339, short_time, Output, Table};

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
}

/// A reservation as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct ReservationView {
    pub(crate) id: String,
    pub(crate) subdomain: String,
    pub(crate) team: String,
    pub(crate) created_by: String,
    pub(crate) created_at: Option<String>,
}

impl From<&Reservation> for ReservationView {
    fn from(r: &Reservation) -> Self {
        Self {
            id: r.id.clone(),
            subdomain: r.subdomain.clone(),
            team: r.team.clone(),
            created_by: r.created_by.clone(),
            created_at: rfc3339(r.created_at.as_ref()),
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
    }
}
