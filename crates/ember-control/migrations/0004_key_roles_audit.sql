-- API keys gain a role (admin, member, read_only) and an optional expiry.
-- Keys of admin teams were admin keys until now, and stay so.
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
UPDATE api_keys SET role = 'admin' WHERE team_id IN (SELECT id FROM teams WHERE is_admin = 1);

-- Who changed what: one row per authenticated mutating API call. Rows are
-- only ever inserted (the server has no code that updates or deletes them).
CREATE TABLE audit_log (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    team_id TEXT,
    actor TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    target TEXT,
    status BIGINT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_team_at ON audit_log (team_id, at);
CREATE INDEX audit_log_target ON audit_log (target);
