-- Every version of every resource; the newest version also lives in `resource`
-- so that reading the current version is one indexed lookup.
CREATE TABLE resource_history (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    rtype        TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    last_updated TEXT    NOT NULL,
    deleted      INTEGER NOT NULL,
    body         TEXT,
    UNIQUE (rtype, id, version)
);
CREATE INDEX resource_history_type ON resource_history (rtype, seq);
CREATE INDEX resource_history_updated ON resource_history (last_updated);

CREATE TABLE resource (
    rtype        TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    last_updated TEXT    NOT NULL,
    deleted      INTEGER NOT NULL,
    body         TEXT,
    PRIMARY KEY (rtype, id)
);

-- Token search index (system|code), filled at write time.
CREATE TABLE search_token (
    rtype  TEXT NOT NULL,
    id     TEXT NOT NULL,
    param  TEXT NOT NULL,
    system TEXT NOT NULL,
    code   TEXT NOT NULL
);
CREATE INDEX search_token_value ON search_token (rtype, param, code, system);
CREATE INDEX search_token_resource ON search_token (rtype, id);
