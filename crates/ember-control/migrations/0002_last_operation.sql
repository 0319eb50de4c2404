-- Where each sandbox's last lifecycle operation spent its time (JSON of
-- model::OperationTiming; NULL before the first one completes).
ALTER TABLE sandboxes ADD COLUMN last_operation TEXT;
