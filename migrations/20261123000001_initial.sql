-- Burrow control-plane schema.
--
-- Uniqueness rules live here, as constraints, never as read-then-write checks in code:
-- emails (case-insensitive), team names, reservations' subdomains, and at most one live tunnel
-- session per subdomain (a partial unique index).

CREATE TABLE accounts (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email          text NOT NULL,
    display_name   text NOT NULL DEFAULT '',
    -- argon2id PHC string; NULL when the account has no password (token-only).
    password_hash  text,
    platform_admin boolean NOT NULL DEFAULT false,
    disabled_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX accounts_email_key ON accounts (lower(email));

CREATE TABLE teams (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL UNIQUE,
    display_name text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    team_id    uuid NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, account_id)
);
CREATE INDEX memberships_account_idx ON memberships (account_id);

CREATE TABLE api_tokens (
    -- The public id embedded in the token text (`brw_<kind>_<id>_...`).
    id                   text PRIMARY KEY,
    kind                 text NOT NULL CHECK (kind IN ('agent', 'api', 'edge')),
    -- Agent tokens belong to a team; API and edge tokens do not.
    team_id              uuid REFERENCES teams (id) ON DELETE CASCADE,
    -- Account that created the token (API tokens act as it); NULL for edge tokens made by the
    -- `edge-token create` command.
    created_by           uuid REFERENCES accounts (id) ON DELETE CASCADE,
    name                 text NOT NULL,
    -- argon2id PHC string of the secret part of the token text.
    secret_hash          text NOT NULL,
    -- After a rotation: the previous secret's hash, accepted until previous_expires_at.
    previous_hash        text,
    previous_expires_at  timestamptz,
    scopes               text[] NOT NULL DEFAULT '{}',
    created_at           timestamptz NOT NULL DEFAULT now(),
    expires_at           timestamptz,
    revoked_at           timestamptz,
    last_used_at         timestamptz,
    CHECK ((kind = 'agent') = (team_id IS NOT NULL))
);
CREATE INDEX api_tokens_team_idx ON api_tokens (team_id);
CREATE INDEX api_tokens_created_by_idx ON api_tokens (created_by);

CREATE TABLE reservations (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    subdomain  text NOT NULL,
    team_id    uuid NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    created_by uuid REFERENCES accounts (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reservations_subdomain_key UNIQUE (subdomain)
);
CREATE INDEX reservations_team_idx ON reservations (team_id);

CREATE TABLE edges (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                text NOT NULL UNIQUE,
    domain              text NOT NULL,
    public_url_template text NOT NULL DEFAULT '',
    agent_addr          text NOT NULL DEFAULT '',
    internal_addr       text NOT NULL DEFAULT '',
    version             text NOT NULL DEFAULT '',
    token_id            text REFERENCES api_tokens (id) ON DELETE SET NULL,
    registered_at       timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    agent_sessions      bigint NOT NULL DEFAULT 0,
    tunnels             bigint NOT NULL DEFAULT 0,
    visitor_connections bigint NOT NULL DEFAULT 0
);

CREATE TABLE tunnel_sessions (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    subdomain          text NOT NULL,
    team_id            uuid NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    edge_id            uuid NOT NULL REFERENCES edges (id) ON DELETE CASCADE,
    token_id           text NOT NULL,
    agent_instance     text NOT NULL DEFAULT '',
    agent_version      text NOT NULL DEFAULT '',
    agent_addr         text NOT NULL DEFAULT '',
    local_addr         text NOT NULL DEFAULT '',
    public_url         text NOT NULL DEFAULT '',
    started_at         timestamptz NOT NULL DEFAULT now(),
    ended_at           timestamptz,
    -- After an unclean end, the name stays held for its team until this instant.
    grace_until        timestamptz,
    connections_total  bigint NOT NULL DEFAULT 0,
    connections_open   bigint NOT NULL DEFAULT 0,
    bytes_in           bigint NOT NULL DEFAULT 0,
    bytes_out          bigint NOT NULL DEFAULT 0,
    websocket_messages bigint NOT NULL DEFAULT 0
);
-- At most one live session per subdomain.
CREATE UNIQUE INDEX tunnel_sessions_live_key ON tunnel_sessions (subdomain) WHERE ended_at IS NULL;
CREATE INDEX tunnel_sessions_grace_idx ON tunnel_sessions (subdomain, grace_until)
    WHERE grace_until IS NOT NULL;
CREATE INDEX tunnel_sessions_team_idx ON tunnel_sessions (team_id) WHERE ended_at IS NULL;

CREATE TABLE audit_log (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    actor_account uuid,
    actor_token   text,
    action        text NOT NULL,
    target        text NOT NULL,
    details       jsonb NOT NULL DEFAULT '{}'
);

-- The change feed: edges and control-plane replicas tail it by revision.
CREATE TABLE change_log (
    revision   bigserial PRIMARY KEY,
    kind       text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Nudges tailers at once; they still poll, because a NOTIFY is lost while a listener
-- reconnects.
CREATE FUNCTION change_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('burrow_change_log', NEW.revision::text);
    RETURN NEW;
END;
$$;
CREATE TRIGGER change_log_notify AFTER INSERT ON change_log
    FOR EACH ROW EXECUTE FUNCTION change_log_notify();
