-- Second factors (see `mfa`): one row per subject. Secrets are sealed (AES-256-GCM under
-- AUTH_MFA_KEY, bound to the subject) before they reach the store, and backup codes are kept
-- only as keyed hashes, so nothing here gives a code away. Times are milliseconds since the
-- epoch on the callers' clocks, as for sessions.
CREATE TABLE IF NOT EXISTS mfa (
    subject          TEXT   PRIMARY KEY,
    -- A pending enrollment: its sealed secret and when it ends.
    pending          TEXT,
    pending_until_ms BIGINT,
    -- The enrolled secret, sealed; NULL when none is.
    secret           TEXT,
    enrolled_ms      BIGINT,
    -- The last TOTP time step accepted: no code of it or an earlier step is accepted again.
    last_step        BIGINT NOT NULL DEFAULT 0,
    backup_codes     TEXT[] NOT NULL DEFAULT '{}'
);

-- What the purge looks for: enrollments that were begun and never confirmed.
CREATE INDEX IF NOT EXISTS mfa_pending_until ON mfa (pending_until_ms) WHERE secret IS NULL;
