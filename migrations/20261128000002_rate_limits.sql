-- Rate-limit state: one row per (policy, key), the GCRA theoretical arrival time and the
-- lockout deadline, in microseconds since the epoch on the database's clock.
CREATE TABLE IF NOT EXISTS rate_limits (
    policy          TEXT        NOT NULL,
    key             TEXT        NOT NULL,
    tat_us          BIGINT      NOT NULL,
    locked_until_us BIGINT      NOT NULL DEFAULT 0,
    -- When the row no longer matters: the allowance is full and no lockout is on.
    expires_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (policy, key)
);

CREATE INDEX IF NOT EXISTS rate_limits_expires_at ON rate_limits (expires_at);

-- One GCRA step, atomic under the row lock; the same arithmetic as `gcra` in
-- src/ratelimit.rs. A cost of 0 peeks: it answers for a cost of 1 and changes nothing.
CREATE OR REPLACE FUNCTION auth_sidecar_rate_limit(
    p_policy TEXT, p_key TEXT, p_interval_us BIGINT, p_burst BIGINT, p_lockout_us BIGINT,
    p_cost BIGINT,
    OUT allowed BOOLEAN, OUT remaining BIGINT, OUT retry_after_us BIGINT,
    OUT reset_after_us BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    now_us   BIGINT := (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT;
    capacity BIGINT := p_burst * p_interval_us;
    v_tat    BIGINT;
    v_lock   BIGINT;
    new_tat  BIGINT;
    allow_at BIGINT;
    until_us BIGINT;
BEGIN
    INSERT INTO rate_limits (policy, key, tat_us, expires_at)
    VALUES (p_policy, p_key, 0, clock_timestamp())
    ON CONFLICT DO NOTHING;
    SELECT tat_us, locked_until_us INTO v_tat, v_lock
    FROM rate_limits WHERE policy = p_policy AND key = p_key FOR UPDATE;

    IF v_lock > now_us THEN
        allowed := false;
        remaining := 0;
        retry_after_us := v_lock - now_us;
        reset_after_us := greatest(v_tat, v_lock) - now_us;
        RETURN;
    END IF;

    v_tat := greatest(v_tat, now_us);
    new_tat := v_tat + greatest(p_cost, 1) * p_interval_us;
    allow_at := new_tat - capacity;
    IF now_us < allow_at THEN
        allowed := false;
        remaining := least(greatest((now_us + capacity - v_tat) / p_interval_us, 0), p_burst);
        IF p_lockout_us > 0 AND p_cost > 0 THEN
            until_us := now_us + p_lockout_us;
            UPDATE rate_limits
            SET locked_until_us = until_us,
                expires_at = to_timestamp(greatest(tat_us, until_us) / 1000000.0)
            WHERE policy = p_policy AND key = p_key;
            retry_after_us := p_lockout_us;
            reset_after_us := greatest(v_tat, until_us) - now_us;
        ELSE
            retry_after_us := allow_at - now_us;
            reset_after_us := v_tat - now_us;
        END IF;
        RETURN;
    END IF;

    allowed := true;
    retry_after_us := 0;
    IF p_cost = 0 THEN
        remaining := least(greatest((now_us + capacity - v_tat) / p_interval_us, 0), p_burst);
        reset_after_us := v_tat - now_us;
        RETURN;
    END IF;
    UPDATE rate_limits
    SET tat_us = new_tat, locked_until_us = 0, expires_at = to_timestamp(new_tat / 1000000.0)
    WHERE policy = p_policy AND key = p_key;
    remaining := least(greatest((now_us + capacity - new_tat) / p_interval_us, 0), p_burst);
    reset_after_us := new_tat - now_us;
END
$$;
