-- Channel fallback: when every call to a contact ended unanswered or failed, their SMS and WhatsApp go
-- once more with the fallback text. At most one per contact, channel and incident, whichever replica
-- queues it.
CREATE UNIQUE INDEX deliveries_fallback ON deliveries (incident_id, phone, channel) WHERE purpose = 'fallback';
