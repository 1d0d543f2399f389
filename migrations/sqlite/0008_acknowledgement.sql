-- Acknowledgement: a person (by a keypress in the call, a link in a message, or an operator by API, CLI
-- or console) says they have the emergency. Who, when and on which channel is kept on the incident; the
-- delivery they acknowledged through, when there was one, so that the notices to the others leave them
-- out and only they get the recording's follow-up call.
ALTER TABLE incidents ADD COLUMN acknowledged_at INTEGER;
ALTER TABLE incidents ADD COLUMN acknowledged_by TEXT;
ALTER TABLE incidents ADD COLUMN acknowledged_via TEXT;
ALTER TABLE incidents ADD COLUMN acknowledged_delivery TEXT;

-- Each message's acknowledge link (/a/<ack_ref>): its own unguessable reference, given when the message
-- is first claimed for sending. Calls are acknowledged by keypress and never get one.
ALTER TABLE deliveries ADD COLUMN ack_ref TEXT;
CREATE UNIQUE INDEX deliveries_ack_ref ON deliveries (ack_ref);

-- 'ack_notice': the message telling a contact already alerted that someone acknowledged. One per
-- contact, channel and incident, whichever replica records the acknowledgement.
CREATE UNIQUE INDEX deliveries_ack_notice ON deliveries (incident_id, phone, channel)
    WHERE purpose = 'ack_notice';
