-- Fault-proof delivery:
-- * lease_token: each claim's own token, so a stale outcome can never overwrite a newer claim;
-- * report_due_at / report_checks: every accepted call or SMS has a deadline for its report;
-- * lease_losses: how often a lease ran out (process died, outcome not recordable): bounded by max_attempts;
-- * rate_buckets: kept for schema parity with PostgreSQL (one SQLite process limits itself in memory).
ALTER TABLE deliveries ADD COLUMN lease_token TEXT;
ALTER TABLE deliveries ADD COLUMN report_due_at INTEGER;
ALTER TABLE deliveries ADD COLUMN report_checks INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN lease_losses INTEGER NOT NULL DEFAULT 0;
CREATE INDEX deliveries_report_due ON deliveries (status, report_due_at);
-- Calls and SMS already waiting for their report get a deadline too (the default report wait after their
-- last change), so none waits forever for a callback that was lost.
UPDATE deliveries SET report_due_at = updated_at + 600000
    WHERE status = 'accepted' AND channel IN ('call', 'sms') AND report_due_at IS NULL;

CREATE TABLE rate_buckets (
    name        TEXT PRIMARY KEY,
    tokens      REAL NOT NULL,
    updated_at  INTEGER NOT NULL
);
