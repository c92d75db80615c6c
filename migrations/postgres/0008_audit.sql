-- The audit log (issue 15): one row per AuditEvent, in log order. `seq` is
-- the entry's position in the Merkle tree (from 0, no gaps); `body` is the
-- AuditEvent as stored, byte for byte (its `id` is `seq`); `digest` is the
-- hex SHA-256 of `body`, the tree's leaf data (leaf hash =
-- SHA-256(0x00 || digest)). The other columns are copies of fields of
-- `body`, for searching; `ehrx audit verify` checks that they agree. Once
-- an entry is past retention its body and copies are cleared and only
-- `seq` and `digest` stay, so the tree still verifies.
CREATE TABLE audit_entry (
    seq      BIGINT PRIMARY KEY,
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
CREATE INDEX audit_entry_patient ON audit_entry (patient, seq);
CREATE INDEX audit_entry_recorded ON audit_entry (recorded);

-- The log's size: the one row (id 1, made by the first append) every
-- appender locks, so entries get consecutive positions in commit order.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY,
    size BIGINT NOT NULL
);

-- Signed checkpoints: the tree's size and root at one moment, signed with
-- the audit key. `note` is the signed text.
CREATE TABLE audit_checkpoint (
    size      BIGINT PRIMARY KEY,
    root      TEXT NOT NULL,
    created   TEXT NOT NULL,
    note      TEXT NOT NULL,
    signature TEXT NOT NULL,
    key_id    TEXT NOT NULL
);

-- Which checkpoint each witness (an authenticated client, e.g. a
-- subscribed hospital) fetched: retention keeps everything after the
-- newest of them.
CREATE TABLE audit_witness (
    witness TEXT   NOT NULL,
    size    BIGINT NOT NULL,
    fetched TEXT   NOT NULL,
    PRIMARY KEY (witness, size)
);

-- The checkpoint signing key (ECDSA P-256; the private half sealed like the
-- other private keys).
CREATE TABLE audit_key (
    id          TEXT PRIMARY KEY,
    private_key TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    created     TEXT NOT NULL
);
