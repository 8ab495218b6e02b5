//! `burrow usage`: metered use of tunnels per team and UTC day.

use clap::Args;
use serde::Serialize;

use burrow_proto::v1::{GetUsageRequest, UsageDay};

use super::client::ApiArgs;
use super::output::{bytes, print_json, Output, Table};

/// `burrow usage …`.
#[derive(Debug, Args)]
pub(crate) struct UsageArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Only this team (name or id); default: every team you belong to (every team for a
    /// platform admin).
    #[arg(long, value_name = "TEAM")]
    team: Option<String>,
    /// First UTC day to include (YYYY-MM-DD); default: 30 days before --to.
    #[arg(long, value_name = "YYYY-MM-DD")]
    from: Option<String>,
    /// Last UTC day to include (YYYY-MM-DD); default: today.
    #[arg(long, value_name = "YYYY-MM-DD")]
    to: Option<String>,
    /// Print JSON (the same as --output json).
    #[arg(long)]
    json: bool,
}

/// One team-day as `--output json` shows it; counts are exact.
#[derive(Debug, Serialize)]
pub(crate) struct UsageView {
    pub(crate) team: String,
    pub(crate) day: String,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) connections: u64,
    pub(crate) websocket_messages: u64,
}

impl From<&UsageDay> for UsageView {
    fn from(d: &UsageDay) -> Self {
        Self {
            team: d.team.clone(),
            day: d.day.clone(),
            bytes_in: d.bytes_in,
            bytes_out: d.bytes_out,
            connections: d.connections,
            websocket_messages: d.websocket_messages,
        }
    }
}

fn table(days: &[UsageDay]) -> Table {
    let mut t = Table::new(&[
        "DAY",
        "TEAM",
        "BYTES IN",
        "BYTES OUT",
        "CONNECTIONS",
        "WS MESSAGES",
    ]);
    for d in days {
        t.row(vec![
            d.day.clone(),
            d.team.clone(),
            bytes(d.bytes_in),
            bytes(d.bytes_out),
            d.connections.to_string(),
            d.websocket_messages.to_string(),
        ]);
    }
    t
}

pub(crate) async fn run(args: UsageArgs) -> anyhow::Result<()> {
    let output = if args.json {
        Output::Json
    } else {
        args.api.output
    };
    let api = super::connect(&args.api).await?;
    let days = api
        .usage()
        .get_usage(GetUsageRequest {
            team: args.team.unwrap_or_default(),
            from: args.from.unwrap_or_default(),
            to: args.to.unwrap_or_default(),
        })
        .await
        .map_err(|s| api.error(s))?
        .into_inner()
        .days;
    match output {
        Output::Json => print_json(&days.iter().map(UsageView::from).collect::<Vec<_>>()),
        Output::Table if days.is_empty() => {
            outln!("No usage in this range.")?;
            Ok(())
        }
        Output::Table => table(&days).print(),
    }
}
