-- The carrier-safe cap: one row per call placed (a provider request for a call: every attempt, redial,
-- escalation repeat, follow-up and alarm call), written in the transaction that claims the call. The
-- calls to one number in the last hour are counted from here; a claim that sent nothing (handed back,
-- cancelled, dry-run) takes its row back. `accepted` is set once the provider took the request: until one
-- call of an incident to a number was accepted, its calls to that number count as its first call, which
-- the cap never holds. Rows older than two days are pruned. No foreign key: pruning deliveries (retention)
-- must not depend on this table.
CREATE TABLE call_placements (
    delivery_id  TEXT NOT NULL,
    lease_token  TEXT NOT NULL,
    incident_id  TEXT NOT NULL,
    phone        TEXT NOT NULL,
    placed_at    BIGINT NOT NULL,
    accepted     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (delivery_id, lease_token)
);
CREATE INDEX call_placements_phone ON call_placements (phone, placed_at);
CREATE INDEX call_placements_incident ON call_placements (incident_id, phone);

-- Periodic jobs that run on one replica at a time (the auditor): the replica holding the row until
-- `until` (the database's clock, ms) runs it; another takes over once it lapses.
CREATE TABLE job_leases (
    name   TEXT PRIMARY KEY,
    owner  TEXT NOT NULL,
    until  BIGINT NOT NULL
);
