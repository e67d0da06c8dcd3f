-- Revoked token ids. Only the id (jti) is kept, never a token.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    token_id   TEXT        PRIMARY KEY,
    -- When the record may go: the token would be rejected as expired by then.
    expires_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The purge task deletes by expiry in bounded batches.
CREATE INDEX IF NOT EXISTS revoked_tokens_expires_at ON revoked_tokens (expires_at);
