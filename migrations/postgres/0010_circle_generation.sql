-- The circle-of-trust generation: one row (id 1, made by the first raise;
-- none is read as 0) whose `gen` every transaction
-- that writes a resource the circle is read from (Consent, Patient,
-- CareTeam, PractitionerRole, Coverage) or a break-the-glass grant raises
-- before it commits. A server keeps callers' circles while `gen` is
-- unchanged, and reads them afresh as soon as it has moved — on any server
-- process sharing the database.
CREATE TABLE circle_generation (
    id  INTEGER PRIMARY KEY,
    gen BIGINT NOT NULL
);
