-- Ember control plane schema, version 1. The same SQL runs on SQLite and
-- PostgreSQL: integers are BIGINT, timestamps are Unix milliseconds, maps are
-- JSON text, booleans are 0/1.

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_admin BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    prefix TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_team ON api_keys (team_id);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    backend TEXT NOT NULL,
    version TEXT NOT NULL,
    vcpus_total BIGINT NOT NULL,
    memory_mib_total BIGINT NOT NULL,
    healthy BIGINT NOT NULL,
    last_error TEXT,
    registered_at BIGINT NOT NULL,
    last_seen_at BIGINT
);

CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    host_id TEXT NOT NULL REFERENCES hosts (id),
    kind TEXT NOT NULL,
    source_sandbox_id TEXT,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    stored_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    released_at BIGINT
);
CREATE INDEX builds_team ON builds (team_id);

CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    name TEXT NOT NULL,
    build_id TEXT NOT NULL REFERENCES builds (id),
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    source_sandbox_id TEXT,
    size_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (team_id, name)
);

CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    state TEXT NOT NULL,
    host_id TEXT REFERENCES hosts (id),
    template TEXT NOT NULL,
    source_build_id TEXT REFERENCES builds (id),
    build_id TEXT REFERENCES builds (id),
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    metadata TEXT NOT NULL,
    env TEXT NOT NULL,
    network TEXT NOT NULL,
    timeout_s BIGINT NOT NULL,
    on_timeout TEXT NOT NULL,
    expires_at BIGINT,
    access_token_sha256 TEXT NOT NULL,
    failure_reason TEXT,
    created_at BIGINT NOT NULL,
    state_changed_at BIGINT NOT NULL,
    destroyed_at BIGINT
);
CREATE INDEX sandboxes_team_created ON sandboxes (team_id, created_at, id);
CREATE INDEX sandboxes_host_state ON sandboxes (host_id, state);
CREATE INDEX sandboxes_state_expires ON sandboxes (state, expires_at);

-- Metadata again as rows, so `key = value` filters are plain SQL on both databases.
CREATE TABLE sandbox_metadata (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, key)
);
CREATE INDEX sandbox_metadata_kv ON sandbox_metadata (key, value);
