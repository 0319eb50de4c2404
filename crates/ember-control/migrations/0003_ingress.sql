-- How a sandbox's ports may be reached through the ingress proxy (JSON of
-- model::Ingress: `public`, `auto_resume`); private and not woken by
-- traffic unless its team says so.
ALTER TABLE sandboxes ADD COLUMN ingress TEXT NOT NULL DEFAULT '{}';
