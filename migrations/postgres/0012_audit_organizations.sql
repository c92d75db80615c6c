-- The Organizations a caller acted for (an AuditEvent's responsible-party
-- agents) become searchable: `AuditEvent?agent=Organization/x`. The column
-- is checked against each entry by `ehrx audit verify` from
-- `audit_head.organizations_from` on: the entries already in the log have
-- no value in it, while their bodies may name organisations. Rows an SQLite
-- backup left in `audit_outbox`, not yet in the log, get theirs from their
-- bodies (JSON there), in the order the event names them.
ALTER TABLE audit_entry ADD COLUMN organizations TEXT;
ALTER TABLE audit_outbox ADD COLUMN organizations TEXT;
ALTER TABLE audit_head ADD COLUMN organizations_from BIGINT NOT NULL DEFAULT 0;
UPDATE audit_head SET organizations_from = size;
UPDATE audit_outbox SET organizations = (
    SELECT string_agg(t.a -> 'who' ->> 'reference', ' ' ORDER BY t.n)
    FROM jsonb_array_elements(audit_outbox.body::jsonb -> 'agent') WITH ORDINALITY AS t(a, n)
    WHERE t.a -> 'type' -> 'coding' -> 0 ->> 'code' = 'RESP'
);
