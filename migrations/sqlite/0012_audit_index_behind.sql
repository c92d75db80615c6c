-- The log's two search indexes become tables kept a little behind the
-- entries. An SQL index is written in the transaction of every group
-- commit, a leaf page or two of each per batch of a few entries; these
-- tables are filled by the log's writer in runs of many entries at once
-- (`audit_head.indexed`: the entries before this position are in them).
-- A search finds the entries after `indexed` by their position, a short
-- range scan, and checks every entry's own columns either way, so an entry
-- is found whether or not it has been indexed yet.
DROP INDEX IF EXISTS audit.audit_entry_patient;
DROP INDEX IF EXISTS audit.audit_entry_recorded;
CREATE TABLE audit.audit_by_patient (
    patient TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (patient, seq)
) WITHOUT ROWID;
CREATE TABLE audit.audit_by_date (
    recorded TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    PRIMARY KEY (recorded, seq)
) WITHOUT ROWID;
ALTER TABLE audit.audit_head ADD COLUMN indexed BIGINT NOT NULL DEFAULT 0;
INSERT INTO audit.audit_by_patient (patient, seq)
    SELECT patient, seq FROM audit.audit_entry WHERE patient IS NOT NULL;
INSERT INTO audit.audit_by_date (recorded, seq)
    SELECT recorded, seq FROM audit.audit_entry WHERE recorded IS NOT NULL;
UPDATE audit.audit_head SET indexed = (SELECT COALESCE(MAX(seq) + 1, 0) FROM audit.audit_entry);
