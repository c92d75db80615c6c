-- The audit log moves to a file of its own, attached to every connection
-- as `audit` (PATH-audit beside the database file PATH). A commit to an
-- SQLite file makes every other connection drop its page cache and memory
-- map of that file; the log's group commits, one every few reads, kept
-- emptying the caches the reads ran on.
--
-- `audit_head.drained` is the newest `audit_outbox` row appended to the log.
-- `seq` is now the table's rowid (INTEGER PRIMARY KEY): one B-tree less to
-- write per entry than a separate primary-key index.
CREATE TABLE IF NOT EXISTS audit.audit_entry (
    seq      INTEGER PRIMARY KEY,
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
    body     TEXT,
    digest   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit.audit_entry_patient ON audit_entry (patient, seq);
CREATE INDEX IF NOT EXISTS audit.audit_entry_recorded ON audit_entry (recorded);
CREATE TABLE IF NOT EXISTS audit.audit_head (
    id      INTEGER PRIMARY KEY,
    size    BIGINT NOT NULL,
    drained BIGINT NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO audit.audit_entry (seq, recorded, type, subtype, action, outcome,
    patient, agent, client, entity, purpose, body, digest)
    SELECT seq, recorded, type, subtype, action, outcome, patient, agent, client, entity,
        purpose, body, digest FROM main.audit_entry;
INSERT OR IGNORE INTO audit.audit_head (id, size) SELECT id, size FROM main.audit_head;
DROP TABLE main.audit_entry;
DROP TABLE main.audit_head;

-- The AuditEvents of a write, committed in the write's own transaction (in
-- the main file: SQLite makes a transaction atomic across attached files
-- only outside WAL mode). The log's writer appends them in order and moves
-- `audit_head.drained` in the same transaction; the next write clears the
-- rows drained. AUTOINCREMENT: an id is never reused, even once the table
-- has been emptied. `body` is the event with an empty `id`.
CREATE TABLE audit_outbox (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
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
