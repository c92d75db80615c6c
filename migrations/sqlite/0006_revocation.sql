-- Access can be taken away from a whole client or user: disabled ones get
-- no new tokens, and their tokens are revoked when they are disabled.
-- `disabled` is when (Unix seconds), 0 while active.
ALTER TABLE auth_client ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE auth_user ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;

-- Every revocation, in commit order: what each server process must drop
-- from its memory of verified tokens. `kind` is token (by jti), grant,
-- client or user; `subject` is the id of that kind.
CREATE TABLE auth_revocation (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT   NOT NULL,
    subject TEXT   NOT NULL,
    at      BIGINT NOT NULL
);
CREATE INDEX auth_token_client ON auth_token (client_id);
CREATE INDEX auth_token_user ON auth_token (user_id);
