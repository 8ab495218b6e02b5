//! Connecting to the Burrow API: where it is, which token to send, and how its errors read.
//!
//! The API address comes from `--api`, else `BURROW_API`, else the config file. The token comes
//! from `--token-file FILE` (`-` = standard input), else `BURROW_TOKEN`, else the config file —
//! never from a command-line argument, which any local user can read in `/proc/*/cmdline`.
//! A token saved in the config file is only sent to the API address saved beside it, so
//! `--api` pointing elsewhere cannot leak it to another server.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use burrow_proto::v1::{
    account_service_client::AccountServiceClient,
    reservation_service_client::ReservationServiceClient, team_service_client::TeamServiceClient,
    token_service_client::TokenServiceClient, tunnel_service_client::TunnelServiceClient,
    usage_service_client::UsageServiceClient,
};

use super::duration::parse_duration;
use super::output::Output;
use crate::config::{self, UserConfig};

/// Environment variable holding an API token (the way scripts and CI pass one).
pub(crate) const ENV_TOKEN: &str = "BURROW_TOKEN";
/// Environment variable holding the API address.
pub(crate) const ENV_API: &str = "BURROW_API";
/// Longest time a connection attempt may take before the command gives up, whatever
/// `--timeout` says: an unreachable API should fail fast.
pub(crate) const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Flags shared by every admin command. They are global, so they may stand before or after
/// the subcommand (`burrow team --output json list` or `burrow team list --output json`).
#[derive(Debug, Clone, Args)]
pub(crate) struct ApiArgs {
    /// Burrow API address: http://HOST:PORT for local use, https://HOST otherwise.
    /// Defaults to the address saved by `burrow login`.
    #[arg(long, global = true, env = ENV_API, value_name = "URL")]
    pub(crate) api: Option<String>,

    /// Read the API token from FILE (`-` reads standard input). Overrides BURROW_TOKEN and the
    /// token saved by `burrow login`. Tokens are never accepted as argument values.
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,

    /// PEM file with the CA certificate(s) that signed the API's certificate, for an https://
    /// API behind a private CA (the system's roots are used otherwise).
    #[arg(long, global = true, env = "BURROW_CA_CERT", value_name = "FILE")]
    pub(crate) ca_cert: Option<PathBuf>,

    /// Output format: aligned tables for people, JSON (stable field names) for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,

    /// How long to wait for the API to answer one request (e.g. 10s, 1m). Connecting gives up
    /// after at most 5s.
    #[arg(long, global = true, env = "BURROW_TIMEOUT", value_name = "DURATION",
          default_value = "10s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,

    /// Refused: catches `--token SECRET` to explain why it is not accepted.
    #[arg(long = "token", global = true, hide = true, num_args = 0..=1,
          default_missing_value = "", value_name = "REFUSED")]
    pub(crate) refused_token: Option<String>,

    /// Refused: catches `--password SECRET` to explain why it is not accepted.
    #[arg(long = "password", global = true, hide = true, num_args = 0..=1,
          default_missing_value = "", value_name = "REFUSED")]
    pub(crate) refused_password: Option<String>,
}

/// Where the token in force came from, for `burrow whoami` (never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenSource {
    /// `--token-file`.
    File,
    /// `BURROW_TOKEN`.
    Env,
    /// The config file written by `burrow login`.
    Config,
}

impl TokenSource {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::File => "--token-file",
            Self::Env => ENV_TOKEN,
            Self::Config => "config file",
        }
    }
}

/// A token and where it came from. `Debug` never shows the secret.
#[derive(Clone)]
pub(crate) struct Credential {
    secret: String,
    pub(crate) source: TokenSource,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("secret", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

impl Credential {
    pub(crate) fn new(secret: String, source: TokenSource) -> Self {
        Self { secret, source }
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }
}

/// The message shown when someone passes a token as an argument value.
pub(crate) const TOKEN_ARGUMENT_REFUSED: &str = "tokens are not accepted as command-line \
arguments (any local user can read them in /proc/*/cmdline): use `burrow login`, set \
BURROW_TOKEN, or pass --token-file FILE (`-` reads standard input)";

/// The message shown when someone passes a password as an argument value.
pub(crate) const PASSWORD_ARGUMENT_REFUSED: &str = "passwords are not accepted as command-line \
arguments (any local user can read them in /proc/*/cmdline): type it at the prompt or pipe it \
in with --password-stdin";

impl ApiArgs {
    /// Refuses a `--token` argument before anything else happens.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.refused_token.is_some() {
            usage!("{TOKEN_ARGUMENT_REFUSED}");
        }
        if self.refused_password.is_some() {
            usage!("{PASSWORD_ARGUMENT_REFUSED}");
        }
        Ok(())
    }

    /// The API address in force: `--api`/`BURROW_API`, else the config file's.
    pub(crate) fn api_address(&self, saved: &UserConfig) -> anyhow::Result<String> {
        let api = self
            .api
            .clone()
            .filter(|a| !a.trim().is_empty())
            .or_else(|| saved.api.clone())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no Burrow API address: run `burrow login --api URL`, pass --api URL or set \
                     {ENV_API}"
                )
            })?;
        normalize_api(&api)
    }

    /// The token in force, if any: `--token-file`, else `BURROW_TOKEN` (`env_token`), else
    /// the config file's — the latter only when talking to the API it was saved for.
    pub(crate) fn credential(
        &self,
        api: &str,
        env_token: Option<String>,
        saved: &UserConfig,
    ) -> anyhow::Result<Option<Credential>> {
        if let Some(path) = &self.token_file {
            let token = config::read_token_file(path)?;
            return Ok(Some(Credential::new(token, TokenSource::File)));
        }
        if let Some(token) = env_token
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
        {
            return Ok(Some(Credential::new(token, TokenSource::Env)));
        }
        let Some(token) = saved.token.clone() else {
            return Ok(None);
        };
        let saved_api = saved.api.as_deref().map(normalize_api).transpose()?;
        if saved_api.as_deref() == Some(api) {
            Ok(Some(Credential::new(token, TokenSource::Config)))
        } else {
            // The saved token belongs to another API: do not send it there.
            Ok(None)
        }
    }
}

/// Checks an API address and brings it to one spelling (no trailing slash), so the address
/// saved by `burrow login` compares equal to the one given later.
pub(crate) fn normalize_api(api: &str) -> anyhow::Result<String> {
    let api = api.trim().trim_end_matches('/');
    let rest = api
        .strip_prefix("http://")
        .or_else(|| api.strip_prefix("https://"))
        .ok_or_else(|| {
            anyhow::anyhow!("API address `{api}` must start with http:// (local use) or https://")
        })?;
    anyhow::ensure!(
        !rest.is_empty() && !rest.contains(char::is_whitespace),
        "API address `{api}` has no valid host"
    );
    api.parse::<http::Uri>()
        .map_err(|e| anyhow::anyhow!("API address `{api}` is not a valid URL: {e}"))?;
    Ok(api.to_owned())
}

/// Adds `authorization: Bearer <token>` to every request, marked sensitive so that no layer
/// prints it.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// A connected API client: one channel, the caller's token, and what is needed to word errors.
pub(crate) struct Api {
    channel: Channel,
    bearer: Bearer,
    /// The address, for error messages.
    pub(crate) address: String,
    /// Per-request deadline, for error messages.
    pub(crate) timeout: Duration,
    /// Where the token came from (`None`: no token).
    pub(crate) token_source: Option<TokenSource>,
}

impl Api {
    /// Connects to `address`, failing fast with a sentence when it cannot be reached.
    pub(crate) async fn connect(
        address: &str,
        credential: Option<&Credential>,
        args: &ApiArgs,
    ) -> anyhow::Result<Self> {
        let bearer = match credential {
            Some(c) => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {}", c.secret()).parse().map_err(|_| {
                        anyhow::anyhow!(
                            "the token from {} contains characters a token cannot have",
                            c.source.describe()
                        )
                    })?;
                value.set_sensitive(true);
                Bearer(Some(value))
            }
            None => Bearer(None),
        };
        let mut endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| anyhow::anyhow!("API address `{address}` is not valid: {e}"))?
            .connect_timeout(args.timeout.min(MAX_CONNECT_TIMEOUT))
            .timeout(args.timeout);
        if address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            tls = match &args.ca_cert {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        anyhow::anyhow!("cannot read CA certificate {}: {e}", path.display())
                    })?;
                    tls.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| anyhow::anyhow!("cannot set up TLS for {address}: {e}"))?;
        } else if args.ca_cert.is_some() {
            usage!("--ca-cert needs an https:// API address, not {address}");
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let cause = root_cause(&e);
            let hint = if cause.contains("certificate") && args.ca_cert.is_none() {
                " (if the API uses a private CA, pass --ca-cert FILE)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot reach the Burrow API at {address}: {cause}{hint}")
        })?;
        Ok(Self {
            channel,
            bearer,
            address: address.to_owned(),
            timeout: args.timeout,
            token_source: credential.map(|c| c.source),
        })
    }

    pub(crate) fn accounts(&self) -> AccountServiceClient<Authed> {
        AccountServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn teams(&self) -> TeamServiceClient<Authed> {
        TeamServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn tokens(&self) -> TokenServiceClient<Authed> {
        TokenServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn reservations(&self) -> ReservationServiceClient<Authed> {
        ReservationServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn tunnels(&self) -> TunnelServiceClient<Authed> {
        TunnelServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn usage(&self) -> UsageServiceClient<Authed> {
        UsageServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Turns a gRPC status into one sentence a person can act on.
    pub(crate) fn error(&self, status: Status) -> anyhow::Error {
        anyhow::anyhow!(describe_status(&status, &self.address, self.timeout))
    }
}

/// The words for each gRPC code: the single place where statuses become sentences.
pub(crate) fn describe_status(status: &Status, address: &str, timeout: Duration) -> String {
    let detail = one_line(status.message());
    let with = |lead: &str| {
        if detail.is_empty() {
            lead.to_owned()
        } else {
            format!("{lead}: {detail}")
        }
    };
    match status.code() {
        Code::Unauthenticated => {
            if detail.is_empty() {
                "not logged in or token invalid: run `burrow login`".to_owned()
            } else {
                format!("not logged in or token invalid ({detail}): run `burrow login`")
            }
        }
        Code::PermissionDenied => with("permission denied"),
        Code::NotFound => with("not found"),
        Code::AlreadyExists => with("already exists"),
        Code::InvalidArgument | Code::OutOfRange => with("invalid request"),
        Code::FailedPrecondition | Code::Aborted => with("refused"),
        Code::ResourceExhausted => with("too many requests, try again later"),
        Code::Unavailable => {
            if detail.is_empty() {
                format!("cannot reach the Burrow API at {address}")
            } else {
                format!("cannot reach the Burrow API at {address}: {detail}")
            }
        }
        // tonic reports its own client-side deadline as CANCELLED "Timeout expired".
        Code::Cancelled if detail == "Timeout expired" => format!(
            "the Burrow API at {address} did not answer within {}s (raise --timeout)",
            timeout.as_secs_f64()
        ),
        Code::DeadlineExceeded => format!(
            "the Burrow API at {address} did not answer within {}s (raise --timeout)",
            timeout.as_secs_f64()
        ),
        Code::Cancelled => "the request was cancelled".to_owned(),
        Code::Unimplemented => with(&format!(
            "the server at {address} does not offer this call (is it a Burrow API of this \
             version?)"
        )),
        Code::Unknown | Code::Internal
            if address.starts_with("http://") && detail.contains("protocol error") =>
        {
            with(&format!(
                "the server at {address} does not speak plain gRPC (does it need https://?)"
            ))
        }
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
            with(&format!("the Burrow API at {address} failed"))
        }
    }
}

/// Collapses a message to one line so failures stay one line.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The innermost cause of an error, which for transport errors is the useful part
/// ("Connection refused (os error 111)").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    one_line(&cause.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn api_addresses_lose_their_trailing_slash_and_need_a_scheme() {
        assert_eq!(
            normalize_api("http://127.0.0.1:7070/").unwrap(),
            "http://127.0.0.1:7070"
        );
        assert!(normalize_api("127.0.0.1:7070").is_err());
        assert!(normalize_api("http://").is_err());
    }

    #[test]
    fn every_status_becomes_one_line() {
        let s = Status::new(Code::NotFound, "team `x`\nnot found");
        let text = describe_status(&s, "http://a", Duration::from_secs(1));
        assert_eq!(text, "not found: team `x` not found");
        let s = Status::unauthenticated("");
        assert_eq!(
            describe_status(&s, "http://a", Duration::from_secs(1)),
            "not logged in or token invalid: run `burrow login`"
        );
    }

    #[test]
    fn a_saved_token_is_only_sent_to_the_api_it_was_saved_for() {
        let saved = UserConfig {
            api: Some("http://a:1/".into()),
            token: Some("brw_api_x".into()),
            ..UserConfig::default()
        };
        let args = ApiArgs {
            api: None,
            token_file: None,
            ca_cert: None,
            output: Output::Table,
            timeout: Duration::from_secs(1),
            refused_token: None,
            refused_password: None,
        };
        let own = args.credential("http://a:1", None, &saved).unwrap();
        assert_eq!(own.map(|c| c.source), Some(TokenSource::Config));
        assert!(args
            .credential("http://b:1", None, &saved)
            .unwrap()
            .is_none());
        let env = args
            .credential("http://b:1", Some("brw_api_y".into()), &saved)
            .unwrap()
            .unwrap();
        assert_eq!((env.secret(), env.source), ("brw_api_y", TokenSource::Env));
    }

    #[test]
    fn credentials_never_show_their_secret_in_debug() {
        let c = Credential::new("brw_api_secret".into(), TokenSource::Env);
        assert!(!format!("{c:?}").contains("secret\""));
        assert!(!format!("{c:?}").contains("brw_api_secret"));
    }
}
