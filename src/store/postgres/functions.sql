-- The atomic steps of shared state, restated from `src/rules/`. Applied at every start (and by
-- `auth-sidecar migrate`) with CREATE OR REPLACE, under an advisory lock, after the migrations:
-- fixing an algorithm needs no migration of table data. The conformance suite
-- (tests/conformance.rs) holds each function to the Rust rule it restates. Times are passed in
-- (milliseconds, or microseconds for rate limits); a NULL `p_now_us` means the database's
-- clock, which is what serving uses for rate limits.

-- The GCRA arithmetic of `rules::gcra::gcra`, on a state (tat, lock) at `p_now`, for the step
-- functions below. A cost of 0 peeks: it answers for a cost of 1 and changes nothing.
-- `changed`: the state after is (new_tat, new_lock), to be stored with an end of the greater.
CREATE OR REPLACE FUNCTION auth_sidecar_gcra(
    p_tat BIGINT, p_lock BIGINT, p_now BIGINT, p_interval_us BIGINT, p_burst BIGINT,
    p_lockout_us BIGINT, p_cost BIGINT,
    OUT allowed BOOLEAN, OUT remaining BIGINT, OUT retry_after_us BIGINT,
    OUT reset_after_us BIGINT, OUT changed BOOLEAN, OUT new_tat BIGINT, OUT new_lock BIGINT)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    capacity BIGINT := p_burst * p_interval_us;
    v_tat    BIGINT := greatest(p_tat, p_now);
    next_tat BIGINT;
    allow_at BIGINT;
BEGIN
    changed := false;
    new_tat := p_tat;
    new_lock := p_lock;
    IF p_lock > p_now THEN
        allowed := false;
        remaining := 0;
        retry_after_us := p_lock - p_now;
        reset_after_us := greatest(p_tat, p_lock) - p_now;
        RETURN;
    END IF;
    next_tat := v_tat + greatest(p_cost, 1) * p_interval_us;
    allow_at := next_tat - capacity;
    IF p_now < allow_at THEN
        allowed := false;
        remaining := least(greatest((p_now + capacity - v_tat) / p_interval_us, 0), p_burst);
        IF p_lockout_us > 0 AND p_cost > 0 THEN
            changed := true;
            new_lock := p_now + p_lockout_us;
            retry_after_us := p_lockout_us;
            reset_after_us := greatest(v_tat, new_lock) - p_now;
        ELSE
            retry_after_us := allow_at - p_now;
            reset_after_us := v_tat - p_now;
        END IF;
        RETURN;
    END IF;
    allowed := true;
    retry_after_us := 0;
    IF p_cost = 0 THEN
        remaining := least(greatest((p_now + capacity - v_tat) / p_interval_us, 0), p_burst);
        reset_after_us := v_tat - p_now;
        RETURN;
    END IF;
    changed := true;
    new_tat := next_tat;
    new_lock := 0;
    remaining := least(greatest((p_now + capacity - next_tat) / p_interval_us, 0), p_burst);
    reset_after_us := next_tat - p_now;
END
$$;

-- One GCRA step under the row lock (`auth_sidecar_gcra`). (The six-argument
-- `auth_sidecar_rate_limit` of the first migration stays for nodes of an older version during
-- a rolling upgrade.)
CREATE OR REPLACE FUNCTION auth_sidecar_rate_limit(
    p_policy TEXT, p_key TEXT, p_interval_us BIGINT, p_burst BIGINT, p_lockout_us BIGINT,
    p_cost BIGINT, p_now_us BIGINT,
    OUT allowed BOOLEAN, OUT remaining BIGINT, OUT retry_after_us BIGINT,
    OUT reset_after_us BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    now_us BIGINT := coalesce(p_now_us,
                              (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT);
    v_tat  BIGINT;
    v_lock BIGINT;
    step   RECORD;
BEGIN
    INSERT INTO rate_limits (policy, key, tat_us, expires_at)
    VALUES (p_policy, p_key, 0, to_timestamp(now_us / 1000000.0))
    ON CONFLICT DO NOTHING;
    SELECT tat_us, locked_until_us INTO v_tat, v_lock
    FROM rate_limits WHERE policy = p_policy AND key = p_key FOR UPDATE;
    step := auth_sidecar_gcra(v_tat, v_lock, now_us, p_interval_us, p_burst, p_lockout_us,
                              p_cost);
    IF step.changed THEN
        UPDATE rate_limits
        SET tat_us = step.new_tat, locked_until_us = step.new_lock,
            expires_at = to_timestamp(greatest(step.new_tat, step.new_lock) / 1000000.0)
        WHERE policy = p_policy AND key = p_key;
    END IF;
    allowed := step.allowed;
    remaining := step.remaining;
    retry_after_us := step.retry_after_us;
    reset_after_us := step.reset_after_us;
END
$$;

-- Many GCRA steps in one statement (`store::batch` gathers them), each exactly as
-- `auth_sidecar_rate_limit` runs it alone, in the order given, one result row per step in that
-- order. The batch's distinct rows are locked one by one in (policy, key) order before the
-- first step (a missing one created first, in the same order): two batches that share keys
-- take them in the same order and so cannot deadlock, whatever order their steps came in. Each
-- lock is a plain one-row SELECT ... FOR UPDATE, which sees a row that another transaction
-- created or changed meanwhile once it commits. The steps then run on the states in memory,
-- and one UPDATE stores those that changed. The database's clock is read once: steps that run
-- at one instant, one after another, are a valid order of steps that arrived together. One
-- statement is one transaction, through a transaction pooler too.
CREATE OR REPLACE FUNCTION auth_sidecar_rate_limit_many(
    p_policy TEXT[], p_key TEXT[], p_interval_us BIGINT[], p_burst BIGINT[],
    p_lockout_us BIGINT[], p_cost BIGINT[], p_now_us BIGINT[])
RETURNS TABLE (allowed BOOLEAN, remaining BIGINT, retry_after_us BIGINT,
               reset_after_us BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    clock    BIGINT := (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT;
    -- The distinct rows in (policy, key) order: names, states, whether a step changed them.
    k_policy TEXT[];
    k_key    TEXT[];
    k_tat    BIGINT[];
    k_lock   BIGINT[];
    k_dirty  BOOLEAN[];
    -- Each step's row number.
    slot     INT[];
    v_tat    BIGINT;
    v_lock   BIGINT;
    j        INT;
    step     RECORD;
BEGIN
    WITH keys AS (
        SELECT DISTINCT s.policy, s.key FROM unnest(p_policy, p_key) AS s(policy, key)
    ), numbered AS (
        SELECT k.policy, k.key, row_number() OVER (ORDER BY k.policy, k.key)::INT AS n
        FROM keys k
    )
    SELECT (SELECT array_agg(x.policy ORDER BY x.n) FROM numbered x),
           (SELECT array_agg(x.key ORDER BY x.n) FROM numbered x),
           (SELECT array_agg(x.n ORDER BY s.ord)
            FROM unnest(p_policy, p_key) WITH ORDINALITY AS s(policy, key, ord)
            JOIN numbered x ON x.policy = s.policy AND x.key = s.key)
    INTO k_policy, k_key, slot;
    FOR j IN 1 .. coalesce(array_length(k_policy, 1), 0) LOOP
        LOOP
            SELECT r.tat_us, r.locked_until_us INTO v_tat, v_lock
            FROM rate_limits r WHERE r.policy = k_policy[j] AND r.key = k_key[j] FOR UPDATE;
            EXIT WHEN FOUND;
            INSERT INTO rate_limits (policy, key, tat_us, expires_at)
            VALUES (k_policy[j], k_key[j], 0, clock_timestamp())
            ON CONFLICT DO NOTHING;
        END LOOP;
        k_tat[j] := v_tat;
        k_lock[j] := v_lock;
        k_dirty[j] := false;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_policy, 1), 0) LOOP
        j := slot[i];
        step := auth_sidecar_gcra(k_tat[j], k_lock[j], coalesce(p_now_us[i], clock),
                                  p_interval_us[i], p_burst[i], p_lockout_us[i], p_cost[i]);
        IF step.changed THEN
            k_tat[j] := step.new_tat;
            k_lock[j] := step.new_lock;
            k_dirty[j] := true;
        END IF;
        allowed := step.allowed;
        remaining := step.remaining;
        retry_after_us := step.retry_after_us;
        reset_after_us := step.reset_after_us;
        RETURN NEXT;
    END LOOP;
    UPDATE rate_limits r
    SET tat_us = u.tat, locked_until_us = u.lock,
        expires_at = to_timestamp(greatest(u.tat, u.lock) / 1000000.0)
    FROM unnest(k_policy, k_key, k_tat, k_lock, k_dirty) AS u(policy, key, tat, lock, dirty)
    WHERE u.dirty AND r.policy = u.policy AND r.key = u.key;
END
$$;

-- Forgets a rate-limit state, and tells every node's revocation view that `p_fact` changed
-- (a NOTIFY, and a change log row for the nodes behind a transaction pooler), so that a denial
-- of it that a view holds goes. Purging expired states needs no word: a denial ends before
-- its state does.
CREATE OR REPLACE FUNCTION auth_sidecar_reset_rate_limit(p_policy TEXT, p_key TEXT, p_fact TEXT)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM rate_limits WHERE policy = p_policy AND key = p_key;
    PERFORM pg_notify('auth_sidecar_facts', p_fact);
    INSERT INTO change_log (fact) VALUES (p_fact);
END
$$;

-- Spends a refresh token under the family's row lock: `rules::rotation::step`. outcome:
-- rotated, replay (with the successor), reused or gone. The token spent last replays within
-- its grace, and once more after it (`retried`). A revoked token never rotates or replays;
-- a spent one presented again revokes the family.
CREATE OR REPLACE FUNCTION auth_sidecar_rotate(
    p_family TEXT, p_presented TEXT, p_refresh TEXT, p_access TEXT, p_iat_ms BIGINT,
    p_now_ms BIGINT, p_replay_until_ms BIGINT, p_revoked BOOLEAN,
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
    IF p_revoked THEN
        IF p_presented = f.current_id THEN
            outcome := 'gone';
            RETURN;
        END IF;
        UPDATE token_families SET revoked = true WHERE id = p_family;
        outcome := 'reused';
        RETURN;
    END IF;
    IF p_presented = f.current_id THEN
        UPDATE token_families
        SET previous_id = p_presented, current_id = p_refresh,
            replay_until_ms = p_replay_until_ms, successor_refresh = p_refresh,
            successor_access = p_access, successor_iat_ms = p_iat_ms, retried = false
        WHERE id = p_family;
        outcome := 'rotated';
        RETURN;
    END IF;
    IF p_presented = f.previous_id AND f.successor_refresh IS NOT NULL
       AND (p_now_ms < f.replay_until_ms OR NOT f.retried) THEN
        IF p_now_ms >= f.replay_until_ms THEN
            UPDATE token_families SET retried = true WHERE id = p_family;
        END IF;
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

-- The seven-argument form, for nodes of the previous version during a rolling upgrade.
CREATE OR REPLACE FUNCTION auth_sidecar_rotate(
    p_family TEXT, p_presented TEXT, p_refresh TEXT, p_access TEXT, p_iat_ms BIGINT,
    p_now_ms BIGINT, p_replay_until_ms BIGINT,
    OUT outcome TEXT, OUT family_ends_ms BIGINT, OUT s_refresh TEXT, OUT s_access TEXT,
    OUT s_iat_ms BIGINT)
LANGUAGE sql AS $$
    SELECT * FROM auth_sidecar_rotate(p_family, p_presented, p_refresh, p_access, p_iat_ms,
                                      p_now_ms, p_replay_until_ms, false)
$$;

-- A touch: `rules::session::touch`. Returns the session as it is now, or no row when it is not
-- live at p_now_ms.
CREATE OR REPLACE FUNCTION auth_sidecar_touch_session(
    p_id TEXT, p_now_ms BIGINT, p_idle_until_ms BIGINT)
RETURNS SETOF sessions
LANGUAGE sql AS $$
    UPDATE sessions
    SET last_seen_ms = p_now_ms,
        idle_expires_ms = CASE WHEN idle_expires_ms IS NULL OR p_idle_until_ms IS NULL
                               THEN idle_expires_ms
                               ELSE least(p_idle_until_ms, expires_ms) END,
        live_until_ms = CASE WHEN idle_expires_ms IS NULL OR p_idle_until_ms IS NULL
                             THEN live_until_ms
                             ELSE least(p_idle_until_ms, expires_ms) END
    WHERE id = p_id AND live_until_ms > p_now_ms
    RETURNING *
$$;

-- Ends a session: `rules::session::end`. The row goes whatever its state; `live` says whether
-- it was live at p_now_ms; `expires_ms` is its absolute end (NULL when there was none), for the
-- tombstone a Redis mirror keeps.
CREATE OR REPLACE FUNCTION auth_sidecar_end_session(
    p_id TEXT, p_now_ms BIGINT, OUT live BOOLEAN, OUT expires_ms BIGINT)
LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM sessions WHERE id = p_id RETURNING id, live_until_ms, expires_ms),
         kept AS (INSERT INTO session_ends (id, expires_ms)
                  SELECT g.id, g.expires_ms FROM gone g WHERE g.expires_ms > p_now_ms
                  ON CONFLICT ON CONSTRAINT session_ends_pkey DO NOTHING)
    SELECT coalesce(bool_or(g.live_until_ms > p_now_ms), false), max(g.expires_ms) FROM gone g
$$;

-- Logout everywhere: the cutoff only rises and its record only lives longer
-- (`rules::session::raise`); every session of the subject goes, remembered in `session_ends`
-- until its absolute end. Returns each ended session with its absolute end and whether it was
-- live at p_now_ms (`rules::session::ended_by_logout` counts those).
CREATE OR REPLACE FUNCTION auth_sidecar_logout(
    p_subject TEXT, p_cutoff_ms BIGINT, p_until_ms BIGINT, p_now_ms BIGINT)
RETURNS TABLE (id TEXT, expires_ms BIGINT, live BOOLEAN)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subject_cutoffs AS c (subject, cutoff_ms, expires_ms)
    VALUES (p_subject, p_cutoff_ms, p_until_ms)
    ON CONFLICT (subject) DO UPDATE
    SET cutoff_ms = greatest(c.cutoff_ms, EXCLUDED.cutoff_ms),
        expires_ms = greatest(c.expires_ms, EXCLUDED.expires_ms);
    RETURN QUERY
    WITH gone AS (DELETE FROM sessions s WHERE s.subject = p_subject
                  RETURNING s.id AS gone_id, s.expires_ms AS gone_ends,
                            s.live_until_ms > p_now_ms AS gone_live),
         kept AS (INSERT INTO session_ends (id, expires_ms)
                  SELECT g.gone_id, g.gone_ends FROM gone g WHERE g.gone_ends > p_now_ms
                  ON CONFLICT ON CONSTRAINT session_ends_pkey DO NOTHING)
    SELECT g.gone_id, g.gone_ends, g.gone_live FROM gone g;
END
$$;
