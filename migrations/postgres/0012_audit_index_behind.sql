-- The schema SQLite has once its log's patient and date indexes became
-- search tables filled behind the entries (backups carry the same tables on
-- both databases). PostgreSQL appends a write's AuditEvents in the write's
-- own transaction and keeps its SQL indexes on `audit_entry`: it neither
-- fills nor reads these tables. Rows an SQLite backup brings are kept
-- until retention clears their entries.
CREATE TABLE audit_by_patient (
    patient TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (patient, seq)
);
CREATE TABLE audit_by_date (
    recorded TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    PRIMARY KEY (recorded, seq)
);
ALTER TABLE audit_head ADD COLUMN indexed BIGINT NOT NULL DEFAULT 0;
