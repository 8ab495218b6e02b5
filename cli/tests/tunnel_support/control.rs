//! An in-process control plane on 127.0.0.1:0 over a fresh database, driven through the
//! public gRPC API with the bootstrap admin's token.

use std::net::SocketAddr;
use std::time::Duration;

use burrow_edge::ControlConfig;
use burrow_proto::v1::{
    self, account_service_client::AccountServiceClient,
    reservation_service_client::ReservationServiceClient, team_service_client::TeamServiceClient,
    token_service_client::TokenServiceClient, tunnel_service_client::TunnelServiceClient,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Request;

pub struct ControlPlane {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub pool: PgPool,
    pub admin: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// A team member who can create agent tokens and reservations.
pub struct Owner {
    pub token: String,
    pub team: String,
}

fn req<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub async fn start_control(pool: PgPool) -> ControlPlane {
    let config = burrow_control::Config {
        change_poll_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_secs(1),
        reconnect_grace: Duration::from_secs(60),
        ..burrow_control::Config::default()
    };
    let admin = burrow_control::bootstrap_admin(&pool, "admin@example.com")
        .await
        .unwrap();
    let server_pool = burrow_control::pool_options(&config)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(burrow_control::run(
        config,
        server_pool,
        listener,
        shutdown.clone(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ControlPlane {
        addr,
        channel,
        pool,
        admin,
        shutdown,
        task,
    }
}

impl ControlPlane {
    /// Edge settings for an edge registered with this control plane: a token made for the
    /// name test edges use ([`super::TEST_EDGE_NAME`]).
    pub async fn edge_control(&self) -> ControlConfig {
        let token = burrow_control::create_edge_token(&self.pool, super::TEST_EDGE_NAME)
            .await
            .unwrap();
        ControlConfig::Remote {
            url: format!("http://{}", self.addr),
            edge_token: token.into(),
            ca_pem: None,
        }
    }

    /// Creates an account owning team `team`.
    pub async fn owner(&self, email: &str, team: &str) -> Owner {
        AccountServiceClient::new(self.channel.clone())
            .create_account(req(
                &self.admin,
                v1::CreateAccountRequest {
                    email: email.into(),
                    display_name: email.into(),
                    password: "correct horse battery".into(),
                    platform_admin: false,
                },
            ))
            .await
            .unwrap();
        let login = AccountServiceClient::new(self.channel.clone())
            .login(Request::new(v1::LoginRequest {
                email: email.into(),
                password: "correct horse battery".into(),
                token_name: "test".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        TeamServiceClient::new(self.channel.clone())
            .create_team(req(
                &login.token,
                v1::CreateTeamRequest {
                    name: team.into(),
                    display_name: String::new(),
                },
            ))
            .await
            .unwrap();
        Owner {
            token: login.token,
            team: team.into(),
        }
    }

    /// Creates an agent token of `owner`'s team; returns (token id, secret).
    pub async fn agent_token(&self, owner: &Owner) -> (String, String) {
        let r = TokenServiceClient::new(self.channel.clone())
            .create_token(req(
                &owner.token,
                v1::CreateTokenRequest {
                    kind: v1::TokenKind::Agent as i32,
                    name: "laptop".into(),
                    team: owner.team.clone(),
                    expires_in_seconds: 0,
                    scopes: vec![],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        (r.token.unwrap().id, r.secret)
    }

    pub async fn reserve(&self, owner: &Owner, subdomain: &str) {
        ReservationServiceClient::new(self.channel.clone())
            .reserve(req(
                &owner.token,
                v1::ReserveRequest {
                    team: owner.team.clone(),
                    subdomain: subdomain.into(),
                },
            ))
            .await
            .unwrap();
    }

    pub async fn revoke(&self, owner: &Owner, token_id: &str) {
        TokenServiceClient::new(self.channel.clone())
            .revoke_token(req(
                &owner.token,
                v1::RevokeTokenRequest {
                    id: token_id.into(),
                },
            ))
            .await
            .unwrap();
    }

    pub async fn kill(&self, owner: &Owner, subdomain: &str) {
        TunnelServiceClient::new(self.channel.clone())
            .kill_tunnel(req(
                &owner.token,
                v1::KillTunnelRequest {
                    subdomain: subdomain.into(),
                },
            ))
            .await
            .unwrap();
    }

    pub async fn list(&self, owner: &Owner) -> Vec<v1::TunnelSession> {
        TunnelServiceClient::new(self.channel.clone())
            .list_tunnels(req(
                &owner.token,
                v1::ListTunnelsRequest {
                    team: owner.team.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .tunnels
    }

    /// Stops the control plane and waits until it has closed its database connections.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for ControlPlane {
    /// Stops the server so its pool closes before the test database is dropped.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
