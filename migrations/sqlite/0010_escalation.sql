-- Escalation and the unreached alarm. The policy an incident follows is fixed when it is stored, like
-- its contacts: `escalation` keeps it (JSON: the policy's name, its tiers of teams, the wait between tiers
-- and the repeats; NULL for a route without a policy, which is one tier, everyone at once).
ALTER TABLE incidents ADD COLUMN escalation TEXT;
-- Nobody acknowledged by this time: the incident is marked unreached (`unreached_at`, since 0004), a flag on the
-- still-open incident, not a status of its own: its dedup key keeps suppressing repeats, and resolving
-- it (by hand, by Alertmanager or by age) works as for any open incident.
ALTER TABLE incidents ADD COLUMN unreached_due_at BIGINT;
CREATE INDEX incidents_unreached_due ON incidents (status, unreached_at, unreached_due_at);

-- Which tier of the policy a delivery alerts (0: the first), and in which pass through the policy
-- (0: the first; `repeat` passes follow). A later tier's deliveries are stored with the incident, due
-- when their tier comes; the first acknowledgement cancels the ones not yet sent.
ALTER TABLE deliveries ADD COLUMN tier INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
