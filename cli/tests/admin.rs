//! The admin side of the `burrow` binary, run as a real process against a real control plane
//! served in-process on `127.0.0.1:0`, with a fresh PostgreSQL database per test.
//!
//! Each run gets its own `HOME` and `BURROW_CONFIG` in a temporary directory, and the
//! `BURROW_*` variables of the surrounding environment are removed, so nothing leaks in from
//! the machine running the tests.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

/// Longest one `burrow` run may take before the test fails instead of hanging.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How fast an unreachable API must be reported.
const UNREACHABLE_REPORTED_WITHIN: Duration = Duration::from_secs(6);

const ADMIN_EMAIL: &str = "admin@example.com";
const ALICE_EMAIL: &str = "alice@example.com";
const ALICE_PASSWORD: &str = "correct horse battery staple";

/// A control plane on an ephemeral port and a private home for the `burrow` runs.
struct App {
    api: String,
    admin_token: String,
    home: tempfile::TempDir,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The result of one `burrow` run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "burrow failed\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a failure reported as exactly one line on stderr, and returns that line.
    fn failed_with_one_line(&self) -> &str {
        assert_ne!(self.code, Some(0), "burrow succeeded: {}", self.stdout);
        assert!(self.code.is_some(), "burrow was killed by a signal");
        let line = self.stderr.trim_end();
        assert_eq!(
            line.lines().count(),
            1,
            "expected one line on stderr, got: {:?}",
            self.stderr
        );
        line
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// One `burrow` invocation being set up.
struct Burrow<'a> {
    app: &'a App,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<String>,
}

impl Burrow<'_> {
    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Runs as the platform admin (token from `BURROW_TOKEN`).
    fn by_admin(self) -> Self {
        let token = self.app.admin_token.clone();
        self.env("BURROW_TOKEN", &token)
    }

    fn stdin(mut self, text: &str) -> Self {
        self.stdin = Some(text.to_owned());
        self
    }

    async fn run(self) -> Run {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"));
        cmd.args(&self.args)
            .env_remove("BURROW_TOKEN")
            .env_remove("BURROW_API")
            .env_remove("BURROW_CA_CERT")
            .env_remove("BURROW_TIMEOUT")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", self.app.home.path())
            .env("BURROW_CONFIG", self.app.config_path())
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn burrow");
        if let Some(text) = self.stdin {
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(text.as_bytes()).await.expect("write stdin");
            drop(stdin);
        }
        let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("burrow {:?} did not finish in time", self.args))
            .expect("wait for burrow");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl App {
    fn config_path(&self) -> PathBuf {
        self.home.path().join("burrow-config.toml")
    }

    /// `burrow ARGS… --api <this control plane>`.
    fn burrow(&self, args: &[&str]) -> Burrow<'_> {
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        args.push("--api".into());
        args.push(self.api.clone());
        Burrow {
            app: self,
            args,
            env: Vec::new(),
            stdin: None,
        }
    }

    /// `burrow ARGS…` with no `--api`: the address must come from the config file.
    fn burrow_bare(&self, args: &[&str]) -> Burrow<'_> {
        Burrow {
            app: self,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
            stdin: None,
        }
    }

    /// Creates Alice (with a password) through the CLI, as the admin.
    async fn create_alice(&self) {
        self.burrow(&["account", "create", ALICE_EMAIL, "--password-stdin"])
            .by_admin()
            .stdin(&format!("{ALICE_PASSWORD}\n"))
            .run()
            .await
            .ok();
    }

    /// Logs Alice in, which saves the API address and her token in the config file.
    async fn login_alice(&self) -> Run {
        self.burrow(&["login", "--email", ALICE_EMAIL, "--password-stdin"])
            .stdin(&format!("{ALICE_PASSWORD}\n"))
            .run()
            .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.server).await;
    }
}

/// Starts the control plane on `127.0.0.1:0` over `pool` and bootstraps a platform admin.
async fn spawn_app(pool: PgPool) -> App {
    spawn_app_with(pool, None).await
}

/// A self-signed certificate for `127.0.0.1`, written as PEM files into `dir`.
fn self_signed_tls(dir: &std::path::Path) -> burrow_control::TlsFiles {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .expect("generate certificate");
    let cert = dir.join("api.crt");
    let key = dir.join("api.key");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    burrow_control::TlsFiles { cert, key }
}

/// [`spawn_app`], serving TLS with `tls` when given (the API address is then `https://`).
async fn spawn_app_with(pool: PgPool, tls: Option<burrow_control::TlsFiles>) -> App {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let admin_token = burrow_control::bootstrap_admin(&pool, ADMIN_EMAIL)
        .await
        .expect("bootstrap");
    let shutdown = CancellationToken::new();
    let config = burrow_control::Config {
        shutdown_grace: Duration::from_secs(2),
        tls,
        ..burrow_control::Config::default()
    };
    let server = tokio::spawn(burrow_control::run(
        config,
        pool,
        listener,
        shutdown.clone(),
    ));
    App {
        api: format!("{scheme}://{addr}"),
        admin_token,
        home: tempfile::tempdir().expect("tempdir"),
        shutdown,
        server,
    }
}

// === login, config file, logout ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn login_writes_a_0600_config_file_that_later_commands_use(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;

    // A BURROW_TOKEN in the environment does not stand in for the password login asked for.
    let login = app
        .burrow(&["login", "--email", ALICE_EMAIL, "--password-stdin"])
        .by_admin()
        .stdin(&format!("{ALICE_PASSWORD}\n"))
        .run()
        .await;
    login.ok();
    assert!(login.stdout.contains(ALICE_EMAIL), "{}", login.stdout);

    let path = app.config_path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path)
            .expect("config")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "config file mode");
    }
    let text = std::fs::read_to_string(&path).expect("read config");
    let saved: toml::Value = toml::from_str(&text).expect("config is TOML");
    assert_eq!(saved["api"].as_str(), Some(app.api.as_str()));
    let token = saved["token"].as_str().expect("token saved");
    assert!(token.starts_with("brw_api_"), "saved token kind");
    assert!(
        !login.stdout.contains(token) && !login.stderr.contains(token),
        "login must not print the token"
    );

    // No --api and no BURROW_TOKEN: both come from the config file.
    let who = app.burrow_bare(&["whoami", "--output", "json"]).run().await;
    who.ok();
    let who = who.json();
    assert_eq!(who["account"]["email"], ALICE_EMAIL);
    assert_eq!(who["api"], app.api.as_str());
    assert_eq!(who["token_source"], "config file");
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn login_and_logout_keep_the_agent_settings_in_the_config_file(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;
    std::fs::write(
        app.config_path(),
        "authtoken = \"brw_agent_kept\"\nedge = \"edge.example.com:4443\"\n",
    )
    .expect("write config");
    app.login_alice().await.ok();
    app.burrow_bare(&["logout"]).run().await.ok();
    let text = std::fs::read_to_string(app.config_path()).expect("config");
    let saved: toml::Value = toml::from_str(&text).expect("toml");
    assert_eq!(saved["authtoken"].as_str(), Some("brw_agent_kept"));
    assert_eq!(saved["edge"].as_str(), Some("edge.example.com:4443"));
    assert_eq!(saved["api"].as_str(), Some(app.api.as_str()));
    assert!(saved.get("token").is_none());
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn login_with_a_wrong_password_fails_with_one_line_and_saves_nothing(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;
    let run = app
        .burrow(&["login", "--email", ALICE_EMAIL, "--password-stdin"])
        .stdin("not the password\n")
        .run()
        .await;
    let line = run.failed_with_one_line();
    assert!(line.contains("wrong email or password"), "{line}");
    assert!(!app.config_path().exists(), "a failed login wrote a config");
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn login_with_a_token_file_saves_the_bootstrap_token(pool: PgPool) {
    let app = spawn_app(pool).await;
    let token_file = app.home.path().join("admin.token");
    std::fs::write(&token_file, format!("{}\n", app.admin_token)).expect("write token");
    let token_file = token_file.to_str().expect("utf-8 path");
    app.burrow(&["login", "--token-file", token_file])
        .run()
        .await
        .ok();
    let who = app.burrow_bare(&["whoami", "-o", "json"]).run().await;
    who.ok();
    assert_eq!(who.json()["account"]["platform_admin"], true);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn logout_revokes_the_saved_token(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;
    app.login_alice().await.ok();
    let text = std::fs::read_to_string(app.config_path()).expect("config");
    let saved: toml::Value = toml::from_str(&text).expect("toml");
    let token = saved["token"].as_str().expect("token").to_owned();

    let out = app.burrow_bare(&["logout"]).run().await;
    out.ok();
    assert!(out.stdout.contains("revoked"), "{}", out.stdout);
    let text = std::fs::read_to_string(app.config_path()).expect("config");
    assert!(
        !text.contains(&token),
        "the token stayed in the config file"
    );

    let refused = app
        .burrow(&["whoami"])
        .env("BURROW_TOKEN", &token)
        .run()
        .await;
    let line = refused.failed_with_one_line();
    assert!(line.contains("not logged in or token invalid"), "{line}");
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn logout_keeps_a_token_saved_from_a_file_valid(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.burrow(&["login", "--token-file", "-"])
        .stdin(&app.admin_token)
        .run()
        .await
        .ok();
    let out = app.burrow_bare(&["logout"]).run().await;
    out.ok();
    assert!(out.stderr.contains("stays valid"), "{}", out.stderr);
    let text = std::fs::read_to_string(app.config_path()).expect("config");
    assert!(!text.contains(&app.admin_token), "the token stayed saved");
    // The bootstrap admin's only token still works.
    app.burrow(&["whoami"]).by_admin().run().await.ok();
    app.stop().await;
}

// === the admin walk-through ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn an_admin_creates_a_team_member_reservation_and_agent_token_then_revokes_it(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;

    let team = app
        .burrow(&["team", "create", "web", "--display-name", "Web team"])
        .by_admin()
        .run()
        .await;
    team.ok();
    assert!(team.stdout.contains("web"), "{}", team.stdout);

    app.burrow(&["team", "add-member", "web", ALICE_EMAIL, "--role", "admin"])
        .by_admin()
        .run()
        .await
        .ok();
    let members = app
        .burrow(&["team", "get", "web", "-o", "json"])
        .by_admin()
        .run()
        .await;
    members.ok();
    let members = members.json();
    let alice = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["email"] == ALICE_EMAIL)
        .expect("alice is a member");
    assert_eq!(alice["role"], "admin");

    // Alice, now a team admin, reserves a name and makes an agent token with her own login.
    app.login_alice().await.ok();
    let reserved = app
        .burrow_bare(&["reservation", "create", "Chat", "--team", "web"])
        .run()
        .await;
    reserved.ok();
    assert!(reserved.stdout.contains("chat"), "{}", reserved.stdout);
    let listed = app
        .burrow_bare(&["reservation", "list", "-o", "json"])
        .run()
        .await;
    listed.ok();
    let listed = listed.json();
    assert_eq!(listed[0]["subdomain"], "chat");
    assert_eq!(listed[0]["team"], "web");

    let created = app
        .burrow_bare(&[
            "token",
            "create",
            "laptop",
            "--kind",
            "agent",
            "--team",
            "web",
            "--expires-in",
            "30d",
            "--scope",
            "pr-*",
            "--scope",
            "chat",
        ])
        .run()
        .await;
    created.ok();
    let secret = created
        .stdout
        .lines()
        .find(|l| l.starts_with("brw_agent_"))
        .expect("the secret is printed once")
        .trim()
        .to_owned();
    assert!(
        created.stderr.contains("shown only this once"),
        "no warning to store the secret: {}",
        created.stderr
    );

    let list = app
        .burrow_bare(&["token", "list", "--team", "web"])
        .run()
        .await;
    list.ok();
    assert!(list.stdout.contains("laptop"), "{}", list.stdout);
    assert!(!list.stdout.contains(&secret), "token list shows a secret");
    let list_json = app
        .burrow_bare(&["token", "list", "--team", "web", "-o", "json"])
        .run()
        .await;
    list_json.ok();
    assert!(
        !list_json.stdout.contains(&secret),
        "JSON list shows a secret"
    );
    let tokens = list_json.json();
    let laptop = tokens
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["name"] == "laptop")
        .expect("laptop token listed");
    assert!(laptop.get("secret").is_none());
    assert_eq!(laptop["kind"], "agent");
    assert_eq!(laptop["team"], "web");
    assert_eq!(laptop["status"], "active");
    let mut scopes: Vec<&str> = laptop["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    scopes.sort_unstable();
    assert_eq!(scopes, ["chat", "pr-*"]);
    assert!(laptop["expires_at"].is_string(), "expiry shown");
    let id = laptop["id"].as_str().expect("id").to_owned();

    let revoked = app
        .burrow_bare(&["token", "revoke", &id, "-o", "json"])
        .run()
        .await;
    revoked.ok();
    assert_eq!(revoked.json()["status"], "revoked");
    let active = app
        .burrow_bare(&["token", "list", "--team", "web", "-o", "json"])
        .run()
        .await;
    active.ok();
    assert!(
        !active.stdout.contains(&id),
        "a revoked token is listed as active"
    );
    let all = app
        .burrow_bare(&["token", "list", "--team", "web", "--all", "-o", "json"])
        .run()
        .await;
    all.ok();
    assert!(all.stdout.contains(&id), "--all lists revoked tokens");
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn rotating_a_token_prints_a_new_secret_and_refuses_the_old_one(pool: PgPool) {
    let app = spawn_app(pool).await;
    let created = app
        .burrow(&["token", "create", "ci", "--kind", "api", "-o", "json"])
        .by_admin()
        .run()
        .await;
    created.ok();
    let created = created.json();
    let old = created["secret"].as_str().expect("secret").to_owned();
    let id = created["token"]["id"].as_str().expect("id").to_owned();
    app.burrow(&["whoami"])
        .env("BURROW_TOKEN", &old)
        .run()
        .await
        .ok();

    let rotated = app.burrow(&["token", "rotate", &id]).by_admin().run().await;
    rotated.ok();
    let new = rotated
        .stdout
        .lines()
        .find(|l| l.starts_with("brw_api_"))
        .expect("the new secret is printed")
        .trim()
        .to_owned();
    assert_ne!(new, old);
    assert!(rotated.stderr.contains("shown only this once"));

    let refused = app
        .burrow(&["whoami"])
        .env("BURROW_TOKEN", &old)
        .run()
        .await;
    let line = refused.failed_with_one_line();
    assert!(line.contains("not logged in or token invalid"), "{line}");
    app.burrow(&["whoami"])
        .env("BURROW_TOKEN", &new)
        .run()
        .await
        .ok();

    let too_long = app
        .burrow(&["token", "rotate", &id, "--overlap", "8d"])
        .by_admin()
        .run()
        .await;
    assert_eq!(too_long.code, Some(2));
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn roles_transfers_releases_and_disabling_work_through_the_cli(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;
    for team in ["web", "mobile"] {
        app.burrow(&["team", "create", team])
            .by_admin()
            .run()
            .await
            .ok();
    }
    app.burrow(&["team", "add-member", "web", ALICE_EMAIL])
        .by_admin()
        .run()
        .await
        .ok();
    let promoted = app
        .burrow(&[
            "team",
            "set-role",
            "web",
            ALICE_EMAIL,
            "owner",
            "-o",
            "json",
        ])
        .by_admin()
        .run()
        .await;
    promoted.ok();
    assert_eq!(promoted.json()["role"], "owner");

    app.burrow(&["reservation", "create", "chat", "--team", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    let moved = app
        .burrow(&[
            "reservation",
            "transfer",
            "chat",
            "--to",
            "mobile",
            "-o",
            "json",
        ])
        .by_admin()
        .run()
        .await;
    moved.ok();
    assert_eq!(moved.json()["team"], "mobile");
    app.burrow(&["reservation", "release", "chat"])
        .by_admin()
        .run()
        .await
        .ok();
    let none = app
        .burrow(&["reservation", "list", "-o", "json"])
        .by_admin()
        .run()
        .await;
    none.ok();
    assert_eq!(none.json(), serde_json::json!([]));
    let gone = app
        .burrow(&["reservation", "release", "chat"])
        .by_admin()
        .run()
        .await;
    assert!(gone.failed_with_one_line().contains("not found"));

    app.burrow(&["team", "remove-member", "web", ALICE_EMAIL])
        .by_admin()
        .run()
        .await
        .ok();
    let team = app
        .burrow(&["team", "get", "web", "-o", "json"])
        .by_admin()
        .run()
        .await;
    team.ok();
    assert!(
        !team.stdout.contains(ALICE_EMAIL),
        "alice is still a member"
    );

    // Disabling Alice stops her saved login at once.
    app.login_alice().await.ok();
    app.burrow_bare(&["whoami"]).run().await.ok();
    let disabled = app
        .burrow(&["account", "disable", ALICE_EMAIL, "-o", "json"])
        .by_admin()
        .run()
        .await;
    disabled.ok();
    assert_eq!(disabled.json()["disabled"], true);
    let refused = app.burrow_bare(&["whoami"]).run().await;
    refused.failed_with_one_line();
    let got = app
        .burrow(&["account", "get", ALICE_EMAIL, "-o", "json"])
        .by_admin()
        .run()
        .await;
    got.ok();
    assert_eq!(got.json()["disabled"], true);
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn killing_a_tunnel_that_is_not_live_is_not_found(pool: PgPool) {
    let app = spawn_app(pool).await;
    let run = app
        .burrow(&["tunnel", "kill", "nothing-here"])
        .by_admin()
        .run()
        .await;
    let line = run.failed_with_one_line();
    assert!(line.contains("not found"), "{line}");
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn tunnel_watch_says_so_when_the_api_ends_the_stream(pool: PgPool) {
    use tokio::io::AsyncBufReadExt as _;

    let app = spawn_app(pool).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["tunnel", "watch", "--api", &app.api])
        .env("BURROW_TOKEN", &app.admin_token)
        .env("HOME", app.home.path())
        .env("BURROW_CONFIG", app.config_path())
        .env_remove("BURROW_TIMEOUT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn burrow");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let first = tokio::time::timeout(RUN_TIMEOUT, stderr.next_line())
        .await
        .expect("watch did not start")
        .expect("read stderr")
        .expect("a line");
    assert!(first.starts_with("Watching tunnels on"), "{first}");

    // Shutting the control plane down ends the stream; the watch reports it and fails.
    app.stop().await;
    let status = tokio::time::timeout(RUN_TIMEOUT, child.wait())
        .await
        .expect("watch did not end with the API")
        .expect("wait");
    assert!(!status.success());
    let last = tokio::time::timeout(RUN_TIMEOUT, stderr.next_line())
        .await
        .expect("no reason given")
        .expect("read stderr")
        .expect("a line");
    assert!(last.starts_with("error: "), "{last}");
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn json_output_parses_with_stable_field_names(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.burrow(&["team", "create", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    app.burrow(&["reservation", "create", "handbook", "--team", "web"])
        .by_admin()
        .run()
        .await
        .ok();

    let teams = app
        .burrow(&["team", "list", "--output", "json"])
        .by_admin()
        .run()
        .await;
    teams.ok();
    let teams = teams.json();
    let web = &teams[0];
    for field in ["id", "name", "display_name", "my_role", "created_at"] {
        assert!(web.get(field).is_some(), "team.{field} missing: {web}");
    }
    assert_eq!(web["name"], "web");
    assert_eq!(web["my_role"], "owner");

    let accounts = app
        .burrow(&["account", "list", "--output", "json"])
        .by_admin()
        .run()
        .await;
    accounts.ok();
    let accounts = accounts.json();
    let admin = &accounts[0];
    for field in [
        "id",
        "email",
        "display_name",
        "platform_admin",
        "disabled",
        "has_password",
        "created_at",
    ] {
        assert!(
            admin.get(field).is_some(),
            "account.{field} missing: {admin}"
        );
    }

    let reservations = app
        .burrow(&["reservation", "list", "--team", "web", "--output", "json"])
        .by_admin()
        .run()
        .await;
    reservations.ok();
    let r = &reservations.json()[0];
    for field in ["id", "subdomain", "team", "created_by", "created_at"] {
        assert!(r.get(field).is_some(), "reservation.{field} missing: {r}");
    }

    let created = app
        .burrow(&["token", "create", "ci", "--kind", "api", "-o", "json"])
        .by_admin()
        .run()
        .await;
    created.ok();
    let created = created.json();
    assert!(created["secret"]
        .as_str()
        .expect("secret")
        .starts_with("brw_api_"));
    assert_eq!(created["token"]["kind"], "api");
    assert!(created["token"]["team"].is_null());

    // The address may also come from BURROW_API.
    let tunnels = app
        .burrow_bare(&["tunnel", "list", "-o", "json"])
        .env("BURROW_API", &app.api)
        .by_admin()
        .run()
        .await;
    tunnels.ok();
    assert_eq!(tunnels.json(), serde_json::json!([]));
    app.stop().await;
}

// === failures: one line, non-zero ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn commands_without_a_valid_token_exit_non_zero_with_one_line(pool: PgPool) {
    let app = spawn_app(pool).await;

    let none = app.burrow(&["team", "list"]).run().await;
    let line = none.failed_with_one_line();
    assert!(line.contains("not logged in"), "{line}");
    assert!(line.contains("burrow login"), "{line}");

    let forged = "brw_api_00000000000000000000000000_notarealsecretnotarealsecret";
    let bad = app
        .burrow(&["reservation", "list"])
        .env("BURROW_TOKEN", forged)
        .run()
        .await;
    let line = bad.failed_with_one_line();
    assert!(line.contains("not logged in or token invalid"), "{line}");
    assert!(!line.contains(forged), "the error echoes the token: {line}");
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn acting_on_another_team_exits_non_zero_with_one_line(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;
    app.burrow(&["team", "create", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    app.login_alice().await.ok();

    // Alice is in no team: she may neither reserve for `web` nor add herself to it.
    let reserve = app
        .burrow_bare(&["reservation", "create", "chat", "--team", "web"])
        .run()
        .await;
    let line = reserve.failed_with_one_line();
    assert!(
        line.contains("permission denied") || line.contains("not found"),
        "{line}"
    );
    let join = app
        .burrow_bare(&["team", "add-member", "web", ALICE_EMAIL])
        .run()
        .await;
    let line = join.failed_with_one_line();
    assert!(
        line.contains("permission denied") || line.contains("not found"),
        "{line}"
    );
    let token = app
        .burrow_bare(&["token", "create", "sneaky", "--team", "web"])
        .run()
        .await;
    token.failed_with_one_line();
    assert!(!token.stdout.contains("brw_"), "a secret was printed");

    // Nothing happened: the admin still sees no reservation.
    let list = app
        .burrow(&["reservation", "list", "-o", "json"])
        .by_admin()
        .run()
        .await;
    list.ok();
    assert_eq!(list.json(), serde_json::json!([]));
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn bad_input_is_reported_in_one_line_naming_the_problem(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.burrow(&["team", "create", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    let bad = app
        .burrow(&["reservation", "create", "no_underscores", "--team", "web"])
        .by_admin()
        .run()
        .await;
    let line = bad.failed_with_one_line();
    assert!(line.contains("invalid request"), "{line}");

    app.burrow(&["reservation", "create", "chat", "--team", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    let again = app
        .burrow(&["reservation", "create", "chat", "--team", "web"])
        .by_admin()
        .run()
        .await;
    let line = again.failed_with_one_line();
    assert!(
        line.contains("already exists") && line.contains("chat"),
        "{line}"
    );

    let duration = app
        .burrow(&[
            "token",
            "create",
            "x",
            "--kind",
            "api",
            "--expires-in",
            "30",
        ])
        .by_admin()
        .run()
        .await;
    assert_eq!(duration.code, Some(2), "usage errors exit 2");
    assert!(
        duration.stderr.contains("needs a unit"),
        "{}",
        duration.stderr
    );
    app.stop().await;
}

// === secrets on the command line ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_token_is_never_accepted_as_an_argument(pool: PgPool) {
    let app = spawn_app(pool).await;
    let secret = app.admin_token.clone();
    for args in [
        vec!["whoami".to_owned(), "--token".to_owned(), secret.clone()],
        vec![
            "team".to_owned(),
            "list".to_owned(),
            format!("--token={secret}"),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = app.burrow(&args).run().await;
        let line = run.failed_with_one_line();
        assert_eq!(run.code, Some(2), "a usage mistake exits 2");
        assert!(line.contains("--token-file"), "{line}");
        assert!(!line.contains(&secret), "the refusal echoes the token");
        assert!(!run.stdout.contains(&secret));
    }
    assert!(!app.config_path().exists(), "a refused token was saved");

    // The supported ways: a file, or standard input.
    let from_stdin = app
        .burrow(&["whoami", "--token-file", "-", "-o", "json"])
        .stdin(&format!("{secret}\n"))
        .run()
        .await;
    from_stdin.ok();
    assert_eq!(from_stdin.json()["token_source"], "--token-file");
    assert!(
        !from_stdin.stdout.contains(&secret),
        "whoami shows the token"
    );
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_password_is_never_accepted_as_an_argument(pool: PgPool) {
    let app = spawn_app(pool).await;
    let run = app
        .burrow(&[
            "login",
            "--email",
            ALICE_EMAIL,
            "--password",
            "hunter2hunter2",
        ])
        .run()
        .await;
    let line = run.failed_with_one_line();
    assert!(line.contains("--password-stdin"), "{line}");
    assert!(!line.contains("hunter2hunter2"));
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_saved_token_is_not_sent_to_another_api(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_alice().await;
    app.login_alice().await.ok();
    // Another address for the same server: the saved token was not saved for it.
    let other = app.api.replace("127.0.0.1", "localhost");
    let run = app.burrow_bare(&["whoami", "--api", &other]).run().await;
    let line = run.failed_with_one_line();
    assert!(line.contains("not logged in to"), "{line}");
    app.stop().await;
}

// === reaching the API ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn an_https_api_is_verified_against_the_given_ca_certificate(pool: PgPool) {
    let certs = tempfile::tempdir().expect("tempdir");
    let tls = self_signed_tls(certs.path());
    let ca = tls.cert.to_str().expect("utf-8 path").to_owned();
    let app = spawn_app_with(pool, Some(tls)).await;
    assert!(app.api.starts_with("https://"));

    let trusted = app
        .burrow(&["whoami", "--ca-cert", &ca, "-o", "json"])
        .by_admin()
        .run()
        .await;
    trusted.ok();
    assert_eq!(trusted.json()["account"]["email"], ADMIN_EMAIL);

    // Without the CA the self-signed certificate is not trusted: a clear refusal, no call.
    let untrusted = app.burrow(&["whoami"]).by_admin().run().await;
    let line = untrusted.failed_with_one_line();
    assert!(line.contains("--ca-cert"), "{line}");
    assert!(
        line.contains("cannot reach the Burrow API at https://"),
        "{line}"
    );
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn a_plain_http_client_is_not_sent_to_a_tls_api_unnoticed(pool: PgPool) {
    let certs = tempfile::tempdir().expect("tempdir");
    let app = spawn_app_with(pool, Some(self_signed_tls(certs.path()))).await;
    let plain = app.api.replace("https://", "http://");
    let run = app
        .burrow_bare(&["whoami", "--api", &plain])
        .by_admin()
        .run()
        .await;
    let line = run.failed_with_one_line();
    assert!(line.contains(&plain) && line.contains("https://"), "{line}");
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_api_fails_quickly_with_a_clear_message() {
    // A port that was free a moment ago and has no listener now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let home = tempfile::tempdir().expect("tempdir");
    let api = format!("http://{addr}");
    let started = Instant::now();
    let out = tokio::time::timeout(
        RUN_TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
            .args(["team", "list", "--api", &api])
            .env("BURROW_TOKEN", "brw_api_x_y")
            .env("HOME", home.path())
            .env("BURROW_CONFIG", home.path().join("c.toml"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("BURROW_TIMEOUT")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("burrow hung")
    .expect("run burrow");
    assert!(
        started.elapsed() < UNREACHABLE_REPORTED_WITHIN,
        "took {:?}",
        started.elapsed()
    );
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let line = run.failed_with_one_line();
    assert!(
        line.contains(&format!("cannot reach the Burrow API at {api}")),
        "{line}"
    );
}

#[tokio::test]
async fn a_silent_api_times_out_with_a_sentence() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let home = tempfile::tempdir().expect("tempdir");
    let api = format!("http://{addr}");
    let started = Instant::now();
    let out = tokio::time::timeout(
        RUN_TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
            .args(["team", "list", "--api", &api, "--timeout", "1s"])
            .env("BURROW_TOKEN", "brw_api_x_y")
            .env("HOME", home.path())
            .env("BURROW_CONFIG", home.path().join("c.toml"))
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("burrow hung")
    .expect("run burrow");
    held.abort();
    assert!(
        started.elapsed() < UNREACHABLE_REPORTED_WITHIN,
        "took {:?}",
        started.elapsed()
    );
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let line = run.failed_with_one_line();
    assert!(line.contains("did not answer within 1s"), "{line}");
}

#[tokio::test]
async fn every_admin_subcommand_has_help_with_examples() {
    let commands: &[&[&str]] = &[
        &["login"],
        &["logout"],
        &["whoami"],
        &["account", "create"],
        &["account", "get"],
        &["account", "list"],
        &["account", "disable"],
        &["account", "set-password"],
        &["team", "create"],
        &["team", "get"],
        &["team", "list"],
        &["team", "add-member"],
        &["team", "remove-member"],
        &["team", "set-role"],
        &["token", "create"],
        &["token", "list"],
        &["token", "revoke"],
        &["token", "rotate"],
        &["reservation", "create"],
        &["reservation", "list"],
        &["reservation", "release"],
        &["reservation", "transfer"],
        &["tunnel", "list"],
        &["tunnel", "watch"],
        &["tunnel", "kill"],
        &["reservation", "policy", "set"],
        &["reservation", "policy", "show"],
        &["reservation", "policy", "clear"],
        &["team", "limits"],
        &["usage"],
    ];
    for args in commands {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
            .args(*args)
            .arg("--help")
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run burrow");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?} --help failed");
        assert!(
            text.contains("Examples:\n  burrow "),
            "{args:?} --help has no examples:\n{text}"
        );
    }
}

// === reservation policies, team limits, usage ===

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn reservation_policies_are_set_shown_and_cleared_through_the_cli(pool: PgPool) {
    let db = pool.clone();
    let app = spawn_app(pool).await;
    app.burrow(&["team", "create", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    app.burrow(&["reservation", "create", "chat", "--team", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    let users = app.home.path().join("reviewers.txt");
    std::fs::write(&users, "# who may look\nreviewer:open sesame\n").unwrap();
    let users = users.to_str().unwrap();

    let set = app
        .burrow(&[
            "reservation",
            "policy",
            "set",
            "chat",
            "--basic-auth-file",
            users,
            "--basic-auth",
            "ci:s3cr3t-pw",
            "--allow-ip",
            "10.0.0.0/8",
            "--allow-ip",
            "2001:db8::/32",
            "--deny-ip",
            "10.9.0.0/16",
            "--allow-origin",
            "https://app.example.com",
            "--request-header-add",
            "X-From: burrow",
            "--request-header-remove",
            "Cookie",
            "--response-header-add",
            "X-Frame-Options:DENY",
            "--response-header-remove",
            "Server",
            "-o",
            "json",
        ])
        .by_admin()
        .run()
        .await;
    set.ok();
    assert!(!set.stdout.contains("$argon2id$") && !set.stdout.contains("open sesame"));
    let shown = set.json();
    assert_eq!(shown["subdomain"], "chat");
    assert_eq!(shown["team"], "web");
    let policy = &shown["policy"];
    assert_eq!(
        policy["basic_auth_users"],
        serde_json::json!(["ci", "reviewer"])
    );
    assert_eq!(
        policy["allow_ips"],
        serde_json::json!(["10.0.0.0/8", "2001:db8::/32"])
    );
    assert_eq!(policy["deny_ips"], serde_json::json!(["10.9.0.0/16"]));
    assert_eq!(
        policy["allow_origins"],
        serde_json::json!(["https://app.example.com"])
    );
    assert_eq!(
        policy["request_headers_add"],
        serde_json::json!([{"name": "X-From", "value": "burrow"}])
    );
    assert_eq!(
        policy["response_headers_remove"],
        serde_json::json!(["Server"])
    );

    // Only argon2id hashes (OWASP parameters) reached the database.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT policy FROM reservations WHERE subdomain = 'chat'")
            .fetch_one(&db)
            .await
            .unwrap();
    let stored = String::from_utf8_lossy(&stored);
    assert_eq!(stored.matches("$argon2id$v=19$m=19456,t=2,p=1$").count(), 2);
    assert!(!stored.contains("open sesame") && !stored.contains("s3cr3t-pw"));

    let table = app
        .burrow(&["reservation", "policy", "show", "chat"])
        .by_admin()
        .run()
        .await;
    table.ok();
    for line in [
        "basic-auth              reviewer",
        "allow-ip                2001:db8::/32",
        "request-header-add      X-From: burrow",
        "response-header-remove  Server",
    ] {
        assert!(
            table.stdout.contains(line),
            "{line:?} not in:\n{}",
            table.stdout
        );
    }
    let listed = app
        .burrow(&["reservation", "list", "-o", "json"])
        .by_admin()
        .run()
        .await;
    listed.ok();
    assert_eq!(
        listed.json()[0]["policy"]["basic_auth_users"][1],
        "reviewer"
    );

    // Mistakes are caught before anything is sent, in one line.
    let bad = app
        .burrow(&[
            "reservation",
            "policy",
            "set",
            "chat",
            "--allow-ip",
            "10.0.0.0/33",
        ])
        .by_admin()
        .run()
        .await;
    assert!(
        bad.failed_with_one_line().contains("prefix length"),
        "{}",
        bad.stderr
    );
    let bad = app
        .burrow(&[
            "reservation",
            "policy",
            "set",
            "chat",
            "--request-header-remove",
            "Host",
        ])
        .by_admin()
        .run()
        .await;
    assert!(
        bad.failed_with_one_line().contains("Host"),
        "{}",
        bad.stderr
    );
    let nothing = app
        .burrow(&["reservation", "policy", "set", "chat"])
        .by_admin()
        .run()
        .await;
    assert!(nothing.failed_with_one_line().contains("policy clear"));
    assert_eq!(nothing.code, Some(2));

    let cleared = app
        .burrow(&["reservation", "policy", "clear", "chat"])
        .by_admin()
        .run()
        .await;
    cleared.ok();
    assert_eq!(cleared.stdout, "No policy is pinned on chat.\n");
    let shown = app
        .burrow(&["reservation", "policy", "show", "chat", "-o", "json"])
        .by_admin()
        .run()
        .await;
    shown.ok();
    assert!(shown.json()["policy"].is_null());
    let missing = app
        .burrow(&["reservation", "policy", "show", "nosuch"])
        .by_admin()
        .run()
        .await;
    assert!(missing.failed_with_one_line().contains("no reservation"));

    // The help says why a password on the command line is a risk.
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["reservation", "policy", "set", "--help"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("(`ps`)"));
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn team_limits_are_shown_to_members_and_set_by_platform_admins(pool: PgPool) {
    let app = spawn_app(pool).await;
    let defaults = burrow_control::Config::default().tunnel_limits;
    app.create_alice().await;
    app.login_alice().await.ok();
    app.burrow_bare(&["team", "create", "web"]).run().await.ok();

    let shown = app
        .burrow_bare(&["team", "limits", "web", "-o", "json"])
        .run()
        .await;
    shown.ok();
    assert_eq!(
        shown.json(),
        serde_json::json!({
            "team": "web",
            "max_websocket_connections": defaults.max_websocket_connections,
            "max_new_connections_per_second": defaults.max_new_connections_per_second,
            "max_bytes_per_second_per_connection": defaults.max_bytes_per_second_per_connection,
            "max_tunnels_per_session": defaults.max_tunnels_per_session,
        })
    );
    let refused = app
        .burrow_bare(&["team", "limits", "web", "--max-websockets", "5000"])
        .run()
        .await;
    assert!(
        refused.failed_with_one_line().contains("platform admins"),
        "{}",
        refused.stderr
    );

    let set = app
        .burrow(&[
            "team",
            "limits",
            "web",
            "--max-websockets",
            "5",
            "--max-bytes-per-second",
            "1048576",
            "-o",
            "json",
        ])
        .by_admin()
        .run()
        .await;
    set.ok();
    let set = set.json();
    assert_eq!(set["max_websocket_connections"], 5);
    assert_eq!(set["max_bytes_per_second_per_connection"], 1_048_576);
    assert_eq!(
        set["max_tunnels_per_session"],
        defaults.max_tunnels_per_session
    );
    // The member sees the new values in a table.
    let table = app.burrow_bare(&["team", "limits", "web"]).run().await;
    table.ok();
    assert!(
        table
            .stdout
            .contains("max websocket connections            5\n"),
        "{}",
        table.stdout
    );
    assert!(table
        .stdout
        .contains("max bytes per second per connection  1048576\n"));

    let reset = app
        .burrow(&["team", "limits", "web", "--reset", "-o", "json"])
        .by_admin()
        .run()
        .await;
    reset.ok();
    assert_eq!(
        reset.json()["max_websocket_connections"],
        defaults.max_websocket_connections
    );
    app.stop().await;
}

#[sqlx::test(migrator = "burrow_control::MIGRATOR")]
async fn usage_is_shown_per_team_and_day_through_the_cli(pool: PgPool) {
    let db = pool.clone();
    let app = spawn_app(pool).await;
    app.burrow(&["team", "create", "web"])
        .by_admin()
        .run()
        .await
        .ok();
    app.burrow(&["team", "create", "docs"])
        .by_admin()
        .run()
        .await
        .ok();
    sqlx::query(
        "INSERT INTO usage_daily (team_id, day, bytes_in, bytes_out, connections,
                                  websocket_messages)
         SELECT t.id, d.day::date, 1536, 3 * 1048576, 12, 340
         FROM teams t, (VALUES ('2026-01-02'), ('2026-01-20'), ('2026-03-01')) AS d(day)",
    )
    .execute(&db)
    .await
    .unwrap();

    let json = app
        .burrow(&[
            "usage",
            "--team",
            "web",
            "--from",
            "2026-01-01",
            "--to",
            "2026-01-31",
            "--json",
        ])
        .by_admin()
        .run()
        .await;
    json.ok();
    assert_eq!(
        json.json(),
        serde_json::json!([
            {"team": "web", "day": "2026-01-02", "bytes_in": 1536, "bytes_out": 3145728,
             "connections": 12, "websocket_messages": 340},
            {"team": "web", "day": "2026-01-20", "bytes_in": 1536, "bytes_out": 3145728,
             "connections": 12, "websocket_messages": 340},
        ])
    );
    let table = app
        .burrow(&["usage", "--from", "2026-01-01", "--to", "2026-01-31"])
        .by_admin()
        .run()
        .await;
    table.ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", table.stdout);
    assert!(lines[0].starts_with("DAY"), "{}", lines[0]);
    assert!(
        lines[1].starts_with("2026-01-02  docs  1.5 KiB   3.0 MiB"),
        "{}",
        lines[1]
    );

    let empty = app
        .burrow(&[
            "usage",
            "--team",
            "web",
            "--from",
            "2025-01-01",
            "--to",
            "2025-01-31",
        ])
        .by_admin()
        .run()
        .await;
    empty.ok();
    assert_eq!(empty.stdout, "No usage in this range.\n");
    let bad = app
        .burrow(&["usage", "--from", "2026-1-1x"])
        .by_admin()
        .run()
        .await;
    assert!(
        bad.failed_with_one_line().contains("YYYY-MM-DD"),
        "{}",
        bad.stderr
    );
    let wide = app
        .burrow(&["usage", "--from", "2020-01-01", "--to", "2026-01-01"])
        .by_admin()
        .run()
        .await;
    assert!(
        wide.failed_with_one_line().contains("366 days"),
        "{}",
        wide.stderr
    );
    app.stop().await;
}
