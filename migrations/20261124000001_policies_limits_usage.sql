-- Reservation-pinned tunnel policies, per-team tunnel limits and daily usage metering.

-- The policy a team admin pinned on a reservation: an encoded `burrow.v1.TunnelPolicy`
-- (protobuf bytes, password hashes included), so new policy fields need no migration. NULL
-- when none. Releasing the reservation deletes the row and with it the policy; a transfer
-- sets it back to NULL.
ALTER TABLE reservations ADD COLUMN policy bytea;

-- A team's own tunnel limits. NULL means "the platform default" (the control plane's
-- configuration), so changing a default reaches every team that did not override it.
ALTER TABLE teams
    ADD COLUMN max_websocket_connections           integer CHECK (max_websocket_connections > 0),
    ADD COLUMN max_new_connections_per_second      integer CHECK (max_new_connections_per_second > 0),
    ADD COLUMN max_bytes_per_second_per_connection bigint  CHECK (max_bytes_per_second_per_connection > 0),
    ADD COLUMN max_tunnels_per_session             integer CHECK (max_tunnels_per_session > 0);

-- Metered use per team and UTC day, added to from the growth of the cumulative per-session
-- counters edges report (`ReportTunnelStats`): one upsert per team per report, never a write
-- per request.
CREATE TABLE usage_daily (
    team_id            uuid   NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    day                date   NOT NULL,
    bytes_in           bigint NOT NULL DEFAULT 0 CHECK (bytes_in >= 0),
    bytes_out          bigint NOT NULL DEFAULT 0 CHECK (bytes_out >= 0),
    connections        bigint NOT NULL DEFAULT 0 CHECK (connections >= 0),
    websocket_messages bigint NOT NULL DEFAULT 0 CHECK (websocket_messages >= 0),
    PRIMARY KEY (team_id, day)
);
