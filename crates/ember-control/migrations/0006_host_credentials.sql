-- Each host's own credentials (hosts no longer share the join token):
-- credential_hash is the SHA-256 of what the control plane issued to the
-- host at its first join (NULL for an agent embedded in `ember server`,
-- which never registers over HTTP); control_token is what replicas present
-- on every gRPC call to it; tls_cert is its self-signed certificate, pinned.
-- revoked_at set: the host is refused until an admin removes it.
CREATE TABLE host_credentials (
    host_id TEXT PRIMARY KEY,
    credential_hash TEXT,
    control_token TEXT NOT NULL,
    tls_cert TEXT,
    issued_at BIGINT NOT NULL,
    revoked_at BIGINT
);
