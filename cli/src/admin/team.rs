//! `burrow team create|get|list|add-member|remove-member|set-role|limits`.

use clap::{Args, Subcommand};
use serde::Serialize;

use burrow_proto::v1::{
    AddMemberRequest, CreateTeamRequest, GetTeamRequest, ListTeamsRequest, Member,
    RemoveMemberRequest, Role, SetRoleRequest, SetTunnelLimitsRequest, Team, TunnelLimits,
};

use super::client::ApiArgs;
use super::output::{or_dash, print_json, rfc3339, role_name, short_time, Output, Table};

/// `burrow team …`.
#[derive(Debug, Args)]
pub(crate) struct TeamArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: TeamCommand,
}

/// A member's role, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RoleArg {
    /// Sees the team's tunnels and reservations; may run agents.
    Member,
    /// A member who also manages members, tokens and reservations.
    Admin,
    /// An admin who also manages owners.
    Owner,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Member => Role::Member,
            RoleArg::Admin => Role::Admin,
            RoleArg::Owner => Role::Owner,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum TeamCommand {
    /// Create a team; you become its owner.
    #[command(after_help = "Examples:
  burrow team create web
  burrow team create web --display-name 'Web team'")]
    Create {
        /// The team's slug: lower-case letters, digits and hyphens, 1–63 characters.
        name: String,
        /// A longer name for people.
        #[arg(long, value_name = "TEXT", default_value = "")]
        display_name: String,
    },
    /// Show a team and its members.
    #[command(after_help = "Examples:
  burrow team get web
  burrow team get web --output json | jq '.members'")]
    Get {
        /// Team name (slug) or id.
        team: String,
    },
    /// List your teams (`--all`: every team, for platform admins).
    #[command(after_help = "Examples:
  burrow team list
  burrow team list --all --output json")]
    List {
        /// Every team on the control plane (platform admins only).
        #[arg(long)]
        all: bool,
    },
    /// Add an account to a team (owners and admins; only owners add owners).
    #[command(after_help = "Examples:
  burrow team add-member web alice@example.com
  burrow team add-member web bob@example.com --role admin")]
    AddMember {
        /// Team name (slug) or id.
        team: String,
        /// Account id (UUID) or email.
        account: String,
        /// The new member's role.
        #[arg(long, value_enum, default_value_t = RoleArg::Member)]
        role: RoleArg,
    },
    /// Remove an account from a team (anyone may remove themselves; the last owner stays).
    #[command(after_help = "Examples:
  burrow team remove-member web bob@example.com")]
    RemoveMember {
        /// Team name (slug) or id.
        team: String,
        /// Account id (UUID) or email.
        account: String,
    },
    /// Change a member's role (only owners grant or take away `owner`).
    #[command(after_help = "Examples:
  burrow team set-role web alice@example.com owner
  burrow team set-role web bob@example.com member")]
    SetRole {
        /// Team name (slug) or id.
        team: String,
        /// Account id (UUID) or email.
        account: String,
        /// The new role.
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// Show or set the limits a team's tunnels run under (setting: platform admins only).
    ///
    /// Without flags, shows the limits in force. With flags, replaces the team's own limits:
    /// a limit not given (or given as 0) follows the platform default. Edges apply a change to
    /// live tunnels at once.
    #[command(after_help = "Examples:
  burrow team limits web
  burrow team limits web --max-websockets 500 --max-bytes-per-second 1048576
  burrow team limits web --reset       # back to the platform defaults")]
    Limits {
        /// Team name (slug) or id.
        team: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// The `team limits` flags.
#[derive(Debug, Args)]
pub(crate) struct LimitArgs {
    /// Most WebSocket connections open at once through one tunnel.
    #[arg(long, value_name = "N")]
    max_websockets: Option<u32>,
    /// Most new visitor connections per second to one tunnel.
    #[arg(long, value_name = "N")]
    max_new_connections_per_second: Option<u32>,
    /// Most bytes per second in each direction on one visitor connection.
    #[arg(long, value_name = "N")]
    max_bytes_per_second: Option<u64>,
    /// Most tunnels one agent session may bind.
    #[arg(long, value_name = "N")]
    max_tunnels: Option<u32>,
    /// Drop the team's own limits: every limit follows the platform default.
    #[arg(long, conflicts_with_all = ["max_websockets", "max_new_connections_per_second",
                                      "max_bytes_per_second", "max_tunnels"])]
    reset: bool,
}

impl LimitArgs {
    /// The limits to set, or `None` when no flag was given (show only).
    fn to_proto(&self) -> Option<TunnelLimits> {
        let any = self.max_websockets.is_some()
            || self.max_new_connections_per_second.is_some()
            || self.max_bytes_per_second.is_some()
            || self.max_tunnels.is_some();
        (any || self.reset).then(|| TunnelLimits {
            max_websocket_connections: self.max_websockets.unwrap_or(0),
            max_new_connections_per_second: self.max_new_connections_per_second.unwrap_or(0),
            max_bytes_per_second_per_connection: self.max_bytes_per_second.unwrap_or(0),
            max_tunnels_per_session: self.max_tunnels.unwrap_or(0),
        })
    }
}

/// A team's limits as `--output json` shows them (0: the edge's own default).
#[derive(Debug, Serialize)]
pub(crate) struct LimitsView {
    pub(crate) team: String,
    pub(crate) max_websocket_connections: u32,
    pub(crate) max_new_connections_per_second: u32,
    pub(crate) max_bytes_per_second_per_connection: u64,
    pub(crate) max_tunnels_per_session: u32,
}

fn show_limits(team: &Team, output: Output) -> anyhow::Result<()> {
    let l = team.tunnel_limits.unwrap_or_default();
    let view = LimitsView {
        team: team.name.clone(),
        max_websocket_connections: l.max_websocket_connections,
        max_new_connections_per_second: l.max_new_connections_per_second,
        max_bytes_per_second_per_connection: l.max_bytes_per_second_per_connection,
        max_tunnels_per_session: l.max_tunnels_per_session,
    };
    match output {
        Output::Json => print_json(&view),
        Output::Table => {
            let cell = |v: u64| {
                if v == 0 {
                    "edge default".to_owned()
                } else {
                    v.to_string()
                }
            };
            let mut t = Table::new(&["LIMIT", "VALUE"]);
            t.row(vec![
                "max websocket connections".into(),
                cell(view.max_websocket_connections.into()),
            ]);
            t.row(vec![
                "max new connections per second".into(),
                cell(view.max_new_connections_per_second.into()),
            ]);
            t.row(vec![
                "max bytes per second per connection".into(),
                cell(view.max_bytes_per_second_per_connection),
            ]);
            t.row(vec![
                "max tunnels per session".into(),
                cell(view.max_tunnels_per_session.into()),
            ]);
            t.print()
        }
    }
}

/// A team as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct TeamView {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) display_name: String,
    /// Your role in the team (`none` for a platform admin who is not a member).
    pub(crate) my_role: &'static str,
    pub(crate) created_at: Option<String>,
    /// Filled by `team get` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) members: Option<Vec<MemberView>>,
}

/// A team member as `--output json` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct MemberView {
    pub(crate) account_id: String,
    pub(crate) email: String,
    pub(crate) display_name: String,
    pub(crate) role: &'static str,
    pub(crate) joined_at: Option<String>,
}

impl From<&Member> for MemberView {
    fn from(m: &Member) -> Self {
        Self {
            account_id: m.account_id.clone(),
            email: m.email.clone(),
            display_name: m.display_name.clone(),
            role: role_name(m.role),
            joined_at: rfc3339(m.joined_at.as_ref()),
        }
    }
}

impl TeamView {
    fn new(t: &Team, with_members: bool) -> Self {
        Self {
            id: t.id.clone(),
            name: t.name.clone(),
            display_name: t.display_name.clone(),
            my_role: role_name(t.my_role),
            created_at: rfc3339(t.created_at.as_ref()),
            members: with_members.then(|| t.members.iter().map(MemberView::from).collect()),
        }
    }
}

fn teams_table(teams: &[Team]) -> Table {
    let mut t = Table::new(&["NAME", "DISPLAY NAME", "MY ROLE", "CREATED", "ID"]);
    for team in teams {
        t.row(vec![
            team.name.clone(),
            or_dash(&team.display_name),
            role_name(team.my_role).to_owned(),
            short_time(team.created_at.as_ref(), "-"),
            team.id.clone(),
        ]);
    }
    t
}

fn members_table(members: &[Member]) -> Table {
    let mut t = Table::new(&["EMAIL", "NAME", "ROLE", "JOINED", "ACCOUNT ID"]);
    for m in members {
        t.row(vec![
            m.email.clone(),
            or_dash(&m.display_name),
            role_name(m.role).to_owned(),
            short_time(m.joined_at.as_ref(), "-"),
            m.account_id.clone(),
        ]);
    }
    t
}

fn show_member(member: &Member, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&MemberView::from(member)),
        Output::Table => members_table(std::slice::from_ref(member)).print(),
    }
}

pub(crate) async fn run(args: TeamArgs) -> anyhow::Result<()> {
    let output = args.api.output;
    let api = super::connect(&args.api).await?;
    let mut client = api.teams();
    match args.command {
        TeamCommand::Create { name, display_name } => {
            let team = client
                .create_team(CreateTeamRequest { name, display_name })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            match output {
                Output::Json => print_json(&TeamView::new(&team, false)),
                Output::Table => teams_table(std::slice::from_ref(&team)).print(),
            }
        }
        TeamCommand::Get { team } => {
            let team = client
                .get_team(GetTeamRequest { team })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            match output {
                Output::Json => print_json(&TeamView::new(&team, true)),
                Output::Table => {
                    teams_table(std::slice::from_ref(&team)).print()?;
                    outln!()?;
                    members_table(&team.members).print()
                }
            }
        }
        TeamCommand::List { all } => {
            let teams = client
                .list_teams(ListTeamsRequest { all })
                .await
                .map_err(|s| api.error(s))?
                .into_inner()
                .teams;
            match output {
                Output::Json => print_json(
                    &teams
                        .iter()
                        .map(|t| TeamView::new(t, false))
                        .collect::<Vec<_>>(),
                ),
                Output::Table => teams_table(&teams).print(),
            }
        }
        TeamCommand::AddMember {
            team,
            account,
            role,
        } => {
            let member = client
                .add_member(AddMemberRequest {
                    team,
                    account,
                    role: Role::from(role).into(),
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show_member(&member, output)
        }
        TeamCommand::RemoveMember { team, account } => {
            client
                .remove_member(RemoveMemberRequest {
                    team: team.clone(),
                    account: account.clone(),
                })
                .await
                .map_err(|s| api.error(s))?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "team": team, "account": account, "removed": true
                })),
                Output::Table => {
                    outln!("Removed {account} from {team}.")?;
                    Ok(())
                }
            }
        }
        TeamCommand::SetRole {
            team,
            account,
            role,
        } => {
            let member = client
                .set_role(SetRoleRequest {
                    team,
                    account,
                    role: Role::from(role).into(),
                })
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            show_member(&member, output)
        }
        TeamCommand::Limits { team, limits } => {
            let answer = match limits.to_proto() {
                Some(limits) => {
                    client
                        .set_tunnel_limits(SetTunnelLimitsRequest {
                            team,
                            limits: Some(limits),
                        })
                        .await
                }
                None => client.get_team(GetTeamRequest { team }).await,
            };
            let team = answer.map_err(|s| api.error(s))?.into_inner();
            show_limits(&team, output)
        }
    }
}
