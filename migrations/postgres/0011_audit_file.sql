-- The schema SQLite has after moving its audit log to a file of its own
-- (backups carry the same tables on both databases). PostgreSQL appends a
-- write's AuditEvents in the write's own transaction, so its `audit_outbox`
-- holds only rows restored from an SQLite backup, which the log's writer
-- appends when it starts; `audit_head.drained` is the newest of them
-- appended.
ALTER TABLE audit_head ADD COLUMN drained BIGINT NOT NULL DEFAULT 0;
CREATE TABLE audit_outbox (
    id       BIGSERIAL PRIMARY KEY,
    recorded TEXT,
    type     TEXT,
    subtype  TEXT,
    action   TEXT,
    outcome  TEXT,
    patient  TEXT,
    agent    TEXT,
    client   TEXT,
    entity   TEXT,
    purpose  TEXT,
    body     TEXT NOT NULL
);
