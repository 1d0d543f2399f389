-- The ops console: signed-in browser sessions, kept in the database so that every replica knows them.
-- Only a SHA-256 hash of the session id is stored: a copy of this table signs nobody in. Times are
-- milliseconds since the Unix epoch.
CREATE TABLE console_sessions (
    id_hash     TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    csrf        TEXT NOT NULL,
    -- SHA-256 of the token that signed the session in: when that token is changed in the settings,
    -- its sessions end.
    token_digest TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    CONSTRAINT console_sessions_role_known CHECK (role IN ('admin', 'console'))
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);

-- The console's change watcher reads MAX(resolved_at) twice a second: an index makes that one look-up.
CREATE INDEX incidents_resolved ON incidents (resolved_at);
