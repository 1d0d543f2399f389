-- Alarms: nobody acknowledged an incident in time (`unreached`), or a provider account refuses every
-- request (`account`). Each is raised once (`dedup_key`: `unreached:<incident>`,
-- `account:<lane>:<reason>`), whichever replica sees it first, and is the outbox of the JSON POST to
-- `alarms.webhook_url`: claimed under a lease judged by the database's clock, retried on the dispatch
-- retry schedule. `recorded`: no webhook was set, nothing is sent.
CREATE TABLE alarms (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    dedup_key    TEXT NOT NULL UNIQUE,
    incident_id  TEXT,
    lane         TEXT,
    reason       TEXT,
    summary      TEXT NOT NULL,
    body         TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    due_at       BIGINT NOT NULL,
    last_error   TEXT,
    raised_at    BIGINT NOT NULL,
    sent_at      BIGINT,
    -- An account alarm stops degrading /readyz once its lane succeeds again; its dedup key is then
    -- freed (suffixed with the alarm's id), so the next failure raises a new one.
    cleared_at   BIGINT,
    -- An account alarm's people (the [unreached] teams) were queued, through their own incident.
    notified_at  BIGINT,
    lease_owner  TEXT,
    lease_until  BIGINT,
    CONSTRAINT alarms_kind_known CHECK (kind IN ('unreached', 'account')),
    CONSTRAINT alarms_status_known CHECK (status IN ('queued', 'sent', 'failed', 'recorded'))
);
CREATE INDEX alarms_due ON alarms (status, due_at);
CREATE INDEX alarms_open_account ON alarms (kind, cleared_at);

-- The alarm to the [unreached] teams: at most one per incident, contact and channel, whichever
-- replica queues it.
CREATE UNIQUE INDEX deliveries_alarm ON deliveries (incident_id, phone, channel) WHERE purpose = 'alarm';
