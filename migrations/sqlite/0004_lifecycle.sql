-- The delivery and incident lifecycle as data. The vocabulary (every state the next features need) lives
-- in lookup tables, so a new state is a row, never a table rebuild. The allowed moves live in
-- delivery_transitions and incident_transitions; the store fills them from the one table in the code
-- (domain::state) every time it migrates.
--
-- SQLite cannot add a foreign key or a CHECK to an existing table without rebuilding it, and a rebuild
-- of a referenced table cannot pass the foreign key check inside the migration's transaction. Triggers
-- give the same guarantee: an unknown status is refused on insert and update, and so is any move the
-- transition table does not list.
CREATE TABLE delivery_states (
    name  TEXT PRIMARY KEY
);
INSERT INTO delivery_states (name) VALUES
    ('queued'), ('held'), ('sending'), ('accepted'), ('answered'), ('acknowledged'), ('delivered'),
    ('read'), ('unconfirmed'), ('failed'), ('simulated'), ('cancelled');

CREATE TABLE incident_states (
    name  TEXT PRIMARY KEY
);
INSERT INTO incident_states (name) VALUES ('open'), ('acknowledged'), ('resolved');

CREATE TABLE delivery_transitions (
    from_state  TEXT NOT NULL REFERENCES delivery_states (name),
    to_state    TEXT NOT NULL REFERENCES delivery_states (name),
    PRIMARY KEY (from_state, to_state)
);
CREATE TABLE incident_transitions (
    from_state  TEXT NOT NULL REFERENCES incident_states (name),
    to_state    TEXT NOT NULL REFERENCES incident_states (name),
    PRIMARY KEY (from_state, to_state)
);

-- The moves allowed when this migration was written, so the triggers never run against an empty table
-- (the code adds any newer move at each start, and is the one place they are written down).
INSERT INTO delivery_transitions (from_state, to_state) VALUES
    ('queued', 'sending'),
    ('queued', 'held'),
    ('queued', 'cancelled'),
    ('queued', 'delivered'),
    ('queued', 'answered'),
    ('queued', 'acknowledged'),
    ('held', 'queued'),
    ('held', 'cancelled'),
    ('sending', 'queued'),
    ('sending', 'accepted'),
    ('sending', 'simulated'),
    ('sending', 'failed'),
    ('sending', 'cancelled'),
    ('accepted', 'queued'),
    ('accepted', 'answered'),
    ('accepted', 'acknowledged'),
    ('accepted', 'delivered'),
    ('accepted', 'read'),
    ('accepted', 'unconfirmed'),
    ('accepted', 'failed'),
    ('accepted', 'cancelled'),
    ('answered', 'acknowledged'),
    ('answered', 'queued'),
    ('answered', 'failed'),
    ('answered', 'cancelled'),
    ('delivered', 'read'),
    ('delivered', 'acknowledged'),
    ('read', 'acknowledged'),
    ('unconfirmed', 'delivered'),
    ('unconfirmed', 'read'),
    ('unconfirmed', 'answered'),
    ('unconfirmed', 'acknowledged'),
    ('unconfirmed', 'failed'),
    ('failed', 'delivered'),
    ('failed', 'read'),
    ('failed', 'answered'),
    ('failed', 'acknowledged');
INSERT INTO incident_transitions (from_state, to_state) VALUES
    ('open', 'acknowledged'), ('open', 'resolved'), ('acknowledged', 'resolved');

CREATE TRIGGER deliveries_status_known BEFORE INSERT ON deliveries
    WHEN NOT EXISTS (SELECT 1 FROM delivery_states WHERE name = NEW.status)
BEGIN
    SELECT RAISE(ABORT, 'unknown delivery status');
END;
CREATE TRIGGER deliveries_status_move BEFORE UPDATE OF status ON deliveries
    WHEN NEW.status <> OLD.status AND NOT EXISTS (
        SELECT 1 FROM delivery_transitions WHERE from_state = OLD.status AND to_state = NEW.status)
BEGIN
    SELECT RAISE(ABORT, 'delivery status move not allowed');
END;
CREATE TRIGGER incidents_status_known BEFORE INSERT ON incidents
    WHEN NOT EXISTS (SELECT 1 FROM incident_states WHERE name = NEW.status)
BEGIN
    SELECT RAISE(ABORT, 'unknown incident status');
END;
CREATE TRIGGER incidents_status_move BEFORE UPDATE OF status ON incidents
    WHEN NEW.status <> OLD.status AND NOT EXISTS (
        SELECT 1 FROM incident_transitions WHERE from_state = OLD.status AND to_state = NEW.status)
BEGIN
    SELECT RAISE(ABORT, 'incident status move not allowed');
END;

-- Whether anybody was reached is a flag with a time, not a state: set on an open or acknowledged
-- incident when every contact was tried and nobody was.
ALTER TABLE incidents ADD COLUMN unreached_at INTEGER;

-- An acknowledged incident is still unresolved: its dedup key keeps suppressing repeats.
DROP INDEX incidents_open_dedup;
CREATE UNIQUE INDEX incidents_open_dedup ON incidents (dedup_key)
    WHERE status <> 'resolved' AND dedup_key IS NOT NULL;

-- A channel has providers: each delivery records which provider (as `name:channel`, the provider's lane)
-- handles it, and work is claimed per lane. Deliveries from before this migration went to the one
-- provider of their channel.
ALTER TABLE deliveries ADD COLUMN provider TEXT NOT NULL DEFAULT '';
UPDATE deliveries SET provider = CASE channel WHEN 'whatsapp' THEN 'gupshup:whatsapp' ELSE 'exotel:' || channel END;
DROP INDEX deliveries_claim;
CREATE INDEX deliveries_claim ON deliveries (provider, status, due_at);
