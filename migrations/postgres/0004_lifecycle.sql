-- The delivery and incident lifecycle as data. The vocabulary (every state the next features need) lives
-- in lookup tables that the status columns reference, so a new state is a row, never a table rebuild.
-- The allowed moves live in delivery_transitions and incident_transitions; the store fills them from the
-- one table in the code (domain::state) every time it migrates, and a trigger refuses any other move.
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

ALTER TABLE deliveries ADD CONSTRAINT deliveries_status_known
    FOREIGN KEY (status) REFERENCES delivery_states (name);
ALTER TABLE incidents ADD CONSTRAINT incidents_status_known
    FOREIGN KEY (status) REFERENCES incident_states (name);

CREATE FUNCTION delivery_status_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> OLD.status AND NOT EXISTS (
        SELECT 1 FROM delivery_transitions WHERE from_state = OLD.status AND to_state = NEW.status
    ) THEN
        RAISE EXCEPTION 'delivery % may not move from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER deliveries_status_move BEFORE UPDATE OF status ON deliveries
    FOR EACH ROW EXECUTE FUNCTION delivery_status_move();

CREATE FUNCTION incident_status_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> OLD.status AND NOT EXISTS (
        SELECT 1 FROM incident_transitions WHERE from_state = OLD.status AND to_state = NEW.status
    ) THEN
        RAISE EXCEPTION 'incident % may not move from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER incidents_status_move BEFORE UPDATE OF status ON incidents
    FOR EACH ROW EXECUTE FUNCTION incident_status_move();

-- Whether anybody was reached is a flag with a time, not a state: set on an open or acknowledged
-- incident when every contact was tried and nobody was.
ALTER TABLE incidents ADD COLUMN unreached_at BIGINT;

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
