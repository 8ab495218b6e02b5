//! `burrow tunnel list|watch|kill`: live tunnels of your teams.

use clap::{Args, Subcommand};
use futures::StreamExt as _;
use serde::Serialize;

use burrow_proto::v1::{
    tunnel_event, KillTunnelRequest, ListTunnelsRequest, TunnelSession, WatchTunnelsRequest,
};

use super::client::ApiArgs;
use super::output::{
    bytes, or_dash, print_json, print_json_line, rfc3339, short_time, Output, Table,
};

/// `burrow tunnel …`.
#[derive(Debug, Args)]
pub(crate) struct TunnelArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: TunnelCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TunnelCommand {
    /// List live tunnels of your teams.
    ///
    /// Connection and byte counts are each edge's figures as of its last heartbeat (every 10 s
    /// unless the control plane's --heartbeat-interval-secs says otherwise), so they trail
    /// live traffic by up to that long.
    #[command(after_help = "Examples:
  burrow tunnel list
  burrow tunnel list --team web --output json | jq -r '.[].public_url'")]
    List {
        /// Only this team's tunnels (name or id).
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
    },
    /// Print tunnels as they start and end, until interrupted (Ctrl-C).
    #[command(after_help = "Examples:
  burrow tunnel watch
  burrow tunnel watch --team web --output json     # one JSON object per line")]
    Watch {
        /// Only this team's tunnels (name or id).
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
    },
    /// End a live tunnel: the edge drops it and its agent is told why.
    #[command(after_help = "Examples:
  burrow tunnel kill chat")]
    Kill {
        /// Subdomain of the live tunnel.
        subdomain: String,
    },
}

/// A live tunnel as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct TunnelView {
    pub(crate) id: String,
    pub(crate) subdomain: String,
    pub(crate) team: String,
    pub(crate) public_url: String,
    pub(crate) edge_id: String,
    pub(crate) edge_name: String,
    pub(crate) token_id: String,
    pub(crate) agent_instance: String,
    pub(crate) agent_version: String,
    pub(crate) agent_addr: String,
    pub(crate) local_addr: String,
    pub(crate) started_at: Option<String>,
    pub(crate) ended_at: Option<String>,
    pub(crate) connections_total: u64,
    pub(crate) connections_open: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// Connections between the agent and its edge (0 once ended).
    pub(crate) lanes: u32,
}

impl From<&TunnelSession> for TunnelView {
    fn from(t: &TunnelSession) -> Self {
        Self {
            id: t.id.clone(),
            subdomain: t.subdomain.clone(),
            team: t.team.clone(),
            public_url: t.public_url.clone(),
            edge_id: t.edge_id.clone(),
            edge_name: t.edge_name.clone(),
            token_id: t.token_id.clone(),
            agent_instance: t.agent_instance.clone(),
            agent_version: t.agent_version.clone(),
            agent_addr: t.agent_addr.clone(),
            local_addr: t.local_addr.clone(),
            started_at: rfc3339(t.started_at.as_ref()),
            ended_at: rfc3339(t.ended_at.as_ref()),
            connections_total: t.connections_total,
            connections_open: t.connections_open,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            lanes: t.lanes,
        }
    }
}

/// One `tunnel watch` line as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct TunnelEventView {
    /// `started` or `ended`.
    pub(crate) event: &'static str,
    pub(crate) tunnel: Option<TunnelView>,
}

fn table(tunnels: &[TunnelSession]) -> Table {
    let mut t = Table::new(&[
        "SUBDOMAIN",
        "TEAM",
        "URL",
        "LOCAL",
        "EDGE",
        "LANES",
        "OPEN",
        "TOTAL",
        "IN",
        "OUT",
        "STARTED",
    ]);
    for s in tunnels {
        t.row(vec![
            s.subdomain.clone(),
            s.team.clone(),
            or_dash(&s.public_url),
            or_dash(&s.local_addr),
            or_dash(if s.edge_name.is_empty() {
                &s.edge_id
            } else {
                &s.edge_name
            }),
            s.lanes.to_string(),
            s.connections_open.to_string(),
            s.connections_total.to_string(),
            bytes(s.bytes_in),
            bytes(s.bytes_out),
            short_time(s.started_at.as_ref(), "-"),
        ]);
    }
    t
}

fn event_name(kind: i32) -> &'static str {
    match tunnel_event::Kind::try_from(kind) {
        Ok(tunnel_event::Kind::Started) => "started",
        Ok(tunnel_event::Kind::Ended) => "ended",
        Ok(tunnel_event::Kind::Unspecified) | Err(_) => "unknown",
    }
}

pub(crate) async fn run(args: TunnelArgs) -> anyhow::Result<()> {
    let output = args.api.output;
    let api = super::connect(&args.api).await?;
    let mut client = api.tunnels();
    match args.command {
        TunnelCommand::List { team } => {
            let tunnels = client
                .list_tunnels(ListTunnelsRequest {
                    team: team.unwrap_or_default(),
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner()
                .tunnels;
            match output {
                Output::Json => {
                    print_json(&tunnels.iter().map(TunnelView::from).collect::<Vec<_>>())
                }
                Output::Table => table(&tunnels).print(),
            }
        }
        TunnelCommand::Watch { team } => {
            let mut stream = client
                .watch_tunnels(WatchTunnelsRequest {
                    team: team.unwrap_or_default(),
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            if output == Output::Table {
                eprintln!("Watching tunnels on {} (Ctrl-C to stop)…", api.address);
            }
            loop {
                let event = tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    event = stream.next() => event,
                };
                let Some(event) = event else {
                    anyhow::bail!("the Burrow API at {} ended the watch", api.address);
                };
                let event = event.map_err(|s| api.error(s))?;
                let name = event_name(event.kind);
                match output {
                    Output::Json => print_json_line(&TunnelEventView {
                        event: name,
                        tunnel: event.tunnel.as_ref().map(TunnelView::from),
                    })?,
                    Output::Table => {
                        let Some(t) = event.tunnel else { continue };
                        let when = if name == "ended" {
                            short_time(t.ended_at.as_ref(), "-")
                        } else {
                            short_time(t.started_at.as_ref(), "-")
                        };
                        outln!(
                            "{when}  {name:<7}  {}  team {}  {}  → {}",
                            t.subdomain,
                            t.team,
                            or_dash(&t.public_url),
                            or_dash(&t.local_addr)
                        )?;
                    }
                }
            }
        }
        TunnelCommand::Kill { subdomain } => {
            client
                .kill_tunnel(KillTunnelRequest {
                    subdomain: subdomain.clone(),
                })
                .await
                .map_err(|s| api.error(s))?;
            match output {
                Output::Json => {
                    print_json(&serde_json::json!({ "subdomain": subdomain, "killed": true }))
                }
                Output::Table => {
                    outln!("Ended the tunnel {subdomain}.")?;
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_each_tunnels_lanes_next_to_its_edge() {
        let live = TunnelSession {
            subdomain: "chat".into(),
            team: "web".into(),
            edge_name: "edge-1".into(),
            lanes: 4,
            connections_open: 2,
            ..Default::default()
        };
        let text = table(&[live]).render();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
        let row: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
        let at = |name: &str| header.iter().position(|h| *h == name);
        assert_eq!(at("LANES"), at("EDGE").map(|i| i + 1), "{text}");
        let lanes = at("LANES").and_then(|i| row.get(i)).copied();
        assert_eq!(lanes, Some("4"), "{text}");
        let open = at("OPEN").and_then(|i| row.get(i)).copied();
        assert_eq!(open, Some("2"), "{text}");
    }
}
