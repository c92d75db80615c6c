-- The SMART authorization server: signing keys, clients, users, and the
-- short-lived state of the OAuth flows. Times are Unix seconds.

-- Signing keys. `retired` is set when a newer key takes over; a retired key
-- stays in the JWKS until every token it signed has expired.
CREATE TABLE auth_key (
    kid         TEXT PRIMARY KEY,
    alg         TEXT   NOT NULL,
    private_pem TEXT   NOT NULL,
    public_jwk  TEXT   NOT NULL,
    created     BIGINT NOT NULL,
    retired     BIGINT
);

-- Registered OAuth clients. Secrets are stored as SHA-256 hashes (they are
-- 256-bit random values, so a slow hash adds nothing).
CREATE TABLE auth_client (
    client_id     TEXT PRIMARY KEY,
    name          TEXT   NOT NULL,
    kind          TEXT   NOT NULL,
    secret_hash   TEXT,
    redirect_uris TEXT   NOT NULL,
    jwks          TEXT,
    jwks_url      TEXT,
    scope         TEXT   NOT NULL,
    created       BIGINT NOT NULL
);

-- People who log in: practitioners, patients, related persons (argon2id).
CREATE TABLE auth_user (
    id            TEXT PRIMARY KEY,
    username      TEXT   NOT NULL UNIQUE,
    password_hash TEXT   NOT NULL,
    fhir_user     TEXT   NOT NULL,
    created       BIGINT NOT NULL
);

-- Browser sessions of logged-in users, by hash of the cookie value.
CREATE TABLE auth_session (
    id_hash TEXT PRIMARY KEY,
    user_id TEXT   NOT NULL,
    expires BIGINT NOT NULL
);

-- EHR launch contexts minted before an app is launched.
CREATE TABLE auth_launch (
    id        TEXT PRIMARY KEY,
    patient   TEXT,
    encounter TEXT,
    expires   BIGINT NOT NULL
);

-- Authorization codes, by hash; single use.
CREATE TABLE auth_code (
    code_hash    TEXT PRIMARY KEY,
    client_id    TEXT   NOT NULL,
    user_id      TEXT   NOT NULL,
    redirect_uri TEXT   NOT NULL,
    scope        TEXT   NOT NULL,
    challenge    TEXT   NOT NULL,
    patient      TEXT,
    encounter    TEXT,
    nonce        TEXT,
    expires      BIGINT NOT NULL,
    used         BIGINT NOT NULL DEFAULT 0
);

-- Issued tokens: access tokens by `jti`, refresh tokens by hash. Every token
-- of one authorization shares `grant_id`, so a replayed code or refresh
-- token revokes the whole family.
CREATE TABLE auth_token (
    id        TEXT PRIMARY KEY,
    kind      TEXT   NOT NULL,
    grant_id  TEXT   NOT NULL,
    client_id TEXT   NOT NULL,
    user_id   TEXT,
    fhir_user TEXT,
    scope     TEXT   NOT NULL,
    patient   TEXT,
    encounter TEXT,
    expires   BIGINT NOT NULL,
    revoked   BIGINT NOT NULL DEFAULT 0,
    used      BIGINT NOT NULL DEFAULT 0,
    created   BIGINT NOT NULL
);
CREATE INDEX auth_token_grant ON auth_token (grant_id);

-- `jti` values of client assertions seen, refused if replayed.
CREATE TABLE auth_assertion (
    client_id TEXT   NOT NULL,
    jti       TEXT   NOT NULL,
    expires   BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
