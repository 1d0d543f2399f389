-- The caller's recording, fetched from Exotel with the account's credentials and kept here so that every
-- replica can serve it at /r/<ref>; an incident-level audit trail; per-delivery links and follow-up calls.
-- Times are milliseconds since the Unix epoch.

-- One recording per incident. `status`: pending (being fetched), stored, unavailable (never came), deleted
-- (past recordings.keep_days). The fetch is a durable job: `due_at` is the next try and `lease_*` the
-- replica trying it.
CREATE TABLE recordings (
    incident_id    TEXT PRIMARY KEY REFERENCES incidents (id),
    source_url     TEXT NOT NULL,
    call_sid       TEXT,
    status         TEXT NOT NULL,
    received_at    BIGINT NOT NULL,
    available_by   BIGINT,
    deadline_at    BIGINT NOT NULL,
    due_at         BIGINT NOT NULL,
    attempts       BIGINT NOT NULL DEFAULT 0,
    auth_refusals  BIGINT NOT NULL DEFAULT 0,
    lease_token    TEXT,
    lease_until    BIGINT,
    content_type   TEXT,
    bytes          BIGINT,
    chunks         BIGINT,
    last_error     TEXT,
    stored_at      BIGINT,
    finished_at    BIGINT,
    CONSTRAINT recordings_status_known CHECK (status IN ('pending', 'stored', 'unavailable', 'deleted'))
);
CREATE INDEX recordings_due ON recordings (status, due_at);

-- The audio, in pieces written in small transactions and read back range by range.
CREATE TABLE recording_chunks (
    incident_id  TEXT NOT NULL REFERENCES recordings (incident_id),
    seq          BIGINT NOT NULL,
    data         BYTEA NOT NULL,
    PRIMARY KEY (incident_id, seq)
);

-- What happened to an incident as a whole (its recording fetched, unavailable, deleted, …).
CREATE TABLE incident_events (
    id           BIGSERIAL PRIMARY KEY,
    incident_id  TEXT NOT NULL REFERENCES incidents (id),
    at           BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    detail       TEXT NOT NULL
);
CREATE INDEX incident_events_incident ON incident_events (incident_id, id);

-- The recording link of each delivery: its own unguessable reference, never the call's CustomField. Links
-- sent before this migration used the greeting reference and keep working.
ALTER TABLE deliveries ADD COLUMN link_ref TEXT;
UPDATE deliveries SET link_ref = greeting_ref;
CREATE UNIQUE INDEX deliveries_link_ref ON deliveries (link_ref);

-- `alert`, or `followup`: the one extra call that plays a recording that arrived after the greeting had
-- to speak text. At most one follow-up per contact and incident, whichever replica adds it.
ALTER TABLE deliveries ADD COLUMN purpose TEXT NOT NULL DEFAULT 'alert';
CREATE UNIQUE INDEX deliveries_followup ON deliveries (incident_id, phone) WHERE purpose = 'followup';
-- When this call's greeting spoke text because the recording was not in yet, and when it played the
-- recording.
ALTER TABLE deliveries ADD COLUMN spoke_text_at BIGINT;
ALTER TABLE deliveries ADD COLUMN played_recording_at BIGINT;
