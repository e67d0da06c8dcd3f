-- Sessions, logout-everywhere cutoffs and refresh-token families. Instants are milliseconds
-- since the epoch on the sidecar's clock (`_ms`), as the domain computes them.

CREATE TABLE IF NOT EXISTS sessions (
    id                 TEXT   PRIMARY KEY,
    subject            TEXT   NOT NULL,
    created_ms         BIGINT NOT NULL,
    expires_ms         BIGINT NOT NULL,
    last_seen_ms       BIGINT NOT NULL,
    idle_expires_ms    BIGINT,
    -- The earlier of the idle deadline and the absolute end: when the session stops counting.
    live_until_ms      BIGINT NOT NULL,
    metadata           JSONB  NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS sessions_subject ON sessions (subject);
CREATE INDEX IF NOT EXISTS sessions_live_until ON sessions (live_until_ms);

-- Tokens of `subject` issued before `cutoff_ms` are revoked; the row may go at `expires_ms`,
-- when all of them have expired.
CREATE TABLE IF NOT EXISTS subject_cutoffs (
    subject    TEXT   PRIMARY KEY,
    cutoff_ms  BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS subject_cutoffs_expires ON subject_cutoffs (expires_ms);

CREATE TABLE IF NOT EXISTS token_families (
    id                TEXT    PRIMARY KEY,
    subject           TEXT    NOT NULL,
    expires_ms        BIGINT  NOT NULL,
    current_id        TEXT    NOT NULL,
    previous_id       TEXT,
    replay_until_ms   BIGINT  NOT NULL DEFAULT 0,
    successor_refresh TEXT,
    successor_access  TEXT,
    successor_iat_ms  BIGINT,
    revoked           BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS token_families_expires ON token_families (expires_ms);

-- Spends a refresh token under the family's row lock: the same decision as `rotate_step` in
-- src/store/mod.rs. outcome: rotated, replay (with the successor), reused or gone.
CREATE OR REPLACE FUNCTION auth_sidecar_rotate(
    p_family TEXT, p_presented TEXT, p_refresh TEXT, p_access TEXT, p_iat_ms BIGINT,
    p_now_ms BIGINT, p_replay_until_ms BIGINT,
    OUT outcome TEXT, OUT family_ends_ms BIGINT, OUT s_refresh TEXT, OUT s_access TEXT,
    OUT s_iat_ms BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    f token_families%ROWTYPE;
BEGIN
    SELECT * INTO f FROM token_families WHERE id = p_family FOR UPDATE;
    IF NOT FOUND OR f.revoked OR f.expires_ms <= p_now_ms THEN
        outcome := 'gone';
        RETURN;
    END IF;
    family_ends_ms := f.expires_ms;
    IF p_presented = f.current_id THEN
        UPDATE token_families
        SET previous_id = p_presented, current_id = p_refresh,
            replay_until_ms = p_replay_until_ms, successor_refresh = p_refresh,
            successor_access = p_access, successor_iat_ms = p_iat_ms
        WHERE id = p_family;
        outcome := 'rotated';
        RETURN;
    END IF;
    IF p_presented = f.previous_id AND p_now_ms < f.replay_until_ms THEN
        outcome := 'replay';
        s_refresh := f.successor_refresh;
        s_access := f.successor_access;
        s_iat_ms := f.successor_iat_ms;
        RETURN;
    END IF;
    UPDATE token_families SET revoked = true WHERE id = p_family;
    outcome := 'reused';
END
$$;
