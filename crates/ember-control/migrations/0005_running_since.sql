-- When a sandbox last started running (create or resume; a snapshot of a
-- running sandbox does not restart the clock), for the server's maximum
-- running time. Rows from before keep NULL and count from state_changed_at.
ALTER TABLE sandboxes ADD COLUMN running_since BIGINT;
