-- Search indexes, one table per search parameter type, filled at write time
-- from the current version of each resource (see src/search/index.rs).
-- `grp` ties the components of one composite value together.
DROP TABLE search_token;

CREATE TABLE idx_string (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    grp    INTEGER NOT NULL,
    norm        TEXT NOT NULL,
    raw         TEXT NOT NULL
);
CREATE INDEX idx_string_0 ON idx_string (rtype, param, norm, id);
CREATE INDEX idx_string_1 ON idx_string (rtype, param, raw, id);
CREATE INDEX idx_string_resource ON idx_string (rtype, id, param, norm);

CREATE TABLE idx_token (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    grp    INTEGER NOT NULL,
    system      TEXT NOT NULL,
    code        TEXT NOT NULL,
    text        TEXT NOT NULL
);
CREATE INDEX idx_token_0 ON idx_token (rtype, param, code, system, id);
CREATE INDEX idx_token_1 ON idx_token (rtype, param, system, id);
CREATE INDEX idx_token_resource ON idx_token (rtype, id, param, code);

CREATE TABLE idx_reference (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    grp    INTEGER NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    url         TEXT NOT NULL
);
CREATE INDEX idx_reference_0 ON idx_reference (rtype, param, target_id, target_type, id);
CREATE INDEX idx_reference_1 ON idx_reference (target_type, target_id, rtype, param, id);
CREATE INDEX idx_reference_2 ON idx_reference (rtype, param, url, id);
CREATE INDEX idx_reference_resource ON idx_reference (rtype, id, param, target_id);

CREATE TABLE idx_date (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    grp    INTEGER NOT NULL,
    lo          TEXT NOT NULL,
    hi          TEXT NOT NULL
);
CREATE INDEX idx_date_0 ON idx_date (rtype, param, lo, hi, id);
CREATE INDEX idx_date_1 ON idx_date (rtype, param, hi, id);
CREATE INDEX idx_date_resource ON idx_date (rtype, id, param, lo);

CREATE TABLE idx_number (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    grp    INTEGER NOT NULL,
    value       REAL NOT NULL
);
CREATE INDEX idx_number_0 ON idx_number (rtype, param, value, id);
CREATE INDEX idx_number_resource ON idx_number (rtype, id, param, value);

CREATE TABLE idx_quantity (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    grp    INTEGER NOT NULL,
    system      TEXT NOT NULL,
    code        TEXT NOT NULL,
    value       REAL NOT NULL
);
CREATE INDEX idx_quantity_0 ON idx_quantity (rtype, param, value, id);
CREATE INDEX idx_quantity_resource ON idx_quantity (rtype, id, param, value);

CREATE TABLE idx_uri (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    grp    INTEGER NOT NULL,
    value       TEXT NOT NULL
);
CREATE INDEX idx_uri_0 ON idx_uri (rtype, param, value, id);
CREATE INDEX idx_uri_resource ON idx_uri (rtype, id, param, value);
