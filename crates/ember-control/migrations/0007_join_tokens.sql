-- One-time join tokens (`ember host join-token create`): each admits one
-- host. token_hash is the SHA-256 of the token, shown once at creation.
-- used_by_host binds the token to the first host ID that presented it, so
-- a retry by that host (its answer was lost) still works while the token
-- has not expired; no other host can use it. Removing that host revokes it.
CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_by TEXT,
    used_at BIGINT,
    used_by_host TEXT,
    revoked_at BIGINT
);
