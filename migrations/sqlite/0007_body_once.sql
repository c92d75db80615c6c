-- Each version's body is stored once: the current version's lives in
-- `resource`, and its `resource_history` row has a NULL body until a newer
-- version (or a deletion) replaces it, when the body moves there. Readers
-- of history take `COALESCE(history.body, current body)`. Deleted versions
-- have no body, as before.
UPDATE resource_history SET body = NULL
WHERE deleted = 0 AND EXISTS (
    SELECT 1 FROM resource r
    WHERE r.rtype = resource_history.rtype AND r.id = resource_history.id
      AND r.version = resource_history.version AND r.deleted = 0
);
