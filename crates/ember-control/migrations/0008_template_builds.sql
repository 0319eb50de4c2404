-- Template builds (`POST /v1/templates`): one row per job, its status, the
-- step it is at and its log (the newest 256 KiB; log_dropped counts the
-- bytes dropped from the front, so a reader's offset stays valid). The
-- control plane running a build writes heartbeat_at every few seconds; an
-- active build whose heartbeat stopped (its control plane died) is failed
-- by whoever reads it next.
CREATE TABLE template_builds (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    step BIGINT NOT NULL,
    steps_total BIGINT NOT NULL,
    step_text TEXT NOT NULL,
    error TEXT,
    log TEXT NOT NULL,
    log_dropped BIGINT NOT NULL,
    sandbox_id TEXT,
    cached_steps BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX template_builds_team_name ON template_builds (team_id, name, created_at);
-- What a template's sandboxes inherit (JSON: env, workdir, user, start),
-- from the image it was built on and its Dockerfile; NULL for a plain
-- snapshot of a sandbox.
ALTER TABLE templates ADD COLUMN defaults TEXT;
