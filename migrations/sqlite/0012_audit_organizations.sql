-- The Organizations a caller acted for (an AuditEvent's responsible-party
-- agents) become searchable: `AuditEvent?agent=Organization/x`. The column
-- is checked against each entry by `ehrx audit verify` from
-- `audit_head.organizations_from` on: the entries already in the log have
-- no value in it, while their bodies may name organisations. Rows writes
-- left in `audit_outbox`, not yet in the log, get theirs from their bodies
-- (JSON there), in the order the event names them.
ALTER TABLE audit.audit_entry ADD COLUMN organizations TEXT;
ALTER TABLE audit_outbox ADD COLUMN organizations TEXT;
ALTER TABLE audit.audit_head ADD COLUMN organizations_from BIGINT NOT NULL DEFAULT 0;
UPDATE audit.audit_head SET organizations_from = size;
UPDATE audit_outbox SET organizations = (
    SELECT group_concat(org, ' ') FROM (
        SELECT json_extract(a.value, '$.who.reference') AS org
        FROM json_each(audit_outbox.body, '$.agent') AS a
        WHERE json_extract(a.value, '$.type.coding[0].code') = 'RESP'
        ORDER BY a.key
    )
);
