-- Connections (lanes) between a live session's agent and its edge, as the edge last reported
-- them; 0 once the session has ended.
ALTER TABLE tunnel_sessions
    ADD COLUMN lanes integer NOT NULL DEFAULT 1 CHECK (lanes >= 0);
