-- WhatsApp numbers opted in with GupShup (OPT_IN), each sent once. Phone numbers in E.164; times are
-- milliseconds since the Unix epoch.

CREATE TABLE whatsapp_optins (
    phone         TEXT PRIMARY KEY,
    opted_in_at   BIGINT NOT NULL
);
