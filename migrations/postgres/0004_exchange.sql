-- Signed-XML exchange: ehrx's own exchange key pair and the signing
-- certificates of the subscribers (hospitals, labs, …) that send documents.

-- At most one row (id = 1): the private key (PKCS#8 PEM) and its self-signed
-- certificate (PEM), generated on first start.
CREATE TABLE exchange_key (
    id              INTEGER PRIMARY KEY,
    private_key_pem TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    created         TEXT NOT NULL
);

-- One row per registered signing certificate; a subscriber (a FHIR
-- Organization) may have several, each valid for its own period.
CREATE TABLE exchange_certificate (
    fingerprint     TEXT PRIMARY KEY,   -- SHA-256 of the DER, lower-case hex
    organization_id TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    subject         TEXT NOT NULL,
    not_before      TEXT NOT NULL,      -- RFC 3339, UTC
    not_after       TEXT NOT NULL,
    added           TEXT NOT NULL,
    revoked         TEXT                -- when revoked, else NULL
);
CREATE INDEX exchange_certificate_org ON exchange_certificate (organization_id);

-- Received documents by the SHA-256 of their signed content. A receipt is
-- claimed before the store transaction runs and completed with the
-- DocumentReference id after it, so a document sent twice at the same time
-- is stored once.
CREATE TABLE exchange_receipt (
    digest             TEXT PRIMARY KEY,
    claimed            TEXT NOT NULL,   -- RFC 3339, UTC
    document_reference TEXT             -- the DocumentReference id once stored
);

-- Per-subscriber channel policy: when require_mtls is 1, documents signed
-- for the organisation are only taken over a TLS connection authenticated
-- with one of its registered, valid certificates.
CREATE TABLE exchange_subscriber (
    organization_id TEXT PRIMARY KEY,
    require_mtls    INTEGER NOT NULL
);
