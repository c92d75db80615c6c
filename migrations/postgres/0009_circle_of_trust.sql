-- A backend client bound to an insurer's Organization, and the insurer
-- role of `policies/insurer.json` it reads under.
ALTER TABLE auth_client ADD COLUMN organization TEXT;
ALTER TABLE auth_client ADD COLUMN insurer_role TEXT;

-- Break-the-glass grants: a practitioner's emergency access to one
-- patient, until `expires_at` (Unix seconds), with the stated reason.
CREATE TABLE emergency_access (
    id           TEXT   NOT NULL PRIMARY KEY,
    actor        TEXT   NOT NULL,
    patient      TEXT   NOT NULL,
    reason       TEXT   NOT NULL,
    granted_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX emergency_access_actor ON emergency_access (actor, expires_at);
CREATE INDEX emergency_access_patient ON emergency_access (patient, granted_at);
