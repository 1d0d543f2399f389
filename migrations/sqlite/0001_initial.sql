-- Incidents, their deliveries (the queue) and the audit trail. Times are milliseconds since the Unix epoch.

CREATE TABLE app_secrets (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE incidents (
    id              TEXT PRIMARY KEY,
    source          TEXT NOT NULL,
    call_sid        TEXT UNIQUE,
    dedup_key       TEXT,
    emergency_type  TEXT NOT NULL,
    route           TEXT NOT NULL,
    caller          TEXT,
    recording_url   TEXT,
    message         TEXT,
    raw_params      TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'open',
    occurred_at     INTEGER,
    received_at     INTEGER NOT NULL,
    resolved_at     INTEGER
);
-- While an incident is open its dedup key suppresses repeats; once resolved the key is free again.
CREATE UNIQUE INDEX incidents_open_dedup ON incidents (dedup_key) WHERE status = 'open' AND dedup_key IS NOT NULL;
CREATE INDEX incidents_received ON incidents (received_at);

CREATE TABLE deliveries (
    id            TEXT PRIMARY KEY,
    incident_id   TEXT NOT NULL REFERENCES incidents (id),
    contact_name  TEXT NOT NULL,
    phone         TEXT NOT NULL,
    channel       TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    greeting_ref  TEXT NOT NULL UNIQUE,
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    redials       INTEGER NOT NULL DEFAULT 0,
    due_at        INTEGER NOT NULL,
    lease_owner   TEXT,
    lease_until   INTEGER,
    provider_id   TEXT,
    provider_status TEXT,
    last_error    TEXT,
    last_request  TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    played_at     INTEGER
);
CREATE INDEX deliveries_due ON deliveries (status, priority, due_at);
CREATE INDEX deliveries_incident ON deliveries (incident_id);
CREATE INDEX deliveries_provider ON deliveries (provider_id);

CREATE TABLE delivery_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id  TEXT NOT NULL REFERENCES deliveries (id),
    at           INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    provider_id  TEXT,
    detail       TEXT NOT NULL
);
CREATE INDEX delivery_events_delivery ON delivery_events (delivery_id, id);
CREATE INDEX delivery_events_provider ON delivery_events (provider_id);
