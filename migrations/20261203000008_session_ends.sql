-- Sessions ended (DeleteSession, a logout) before their absolute end, kept until it: what a
-- refill of tiered storage copies to Redis as tombstones, so that a write landing in Redis after
-- it lost its data (a refill's copy read before the end, a mirror write held on a slow link)
-- cannot bring an ended session back for long: the next refill ends it again before it vouches.
CREATE TABLE IF NOT EXISTS session_ends (
    id         TEXT   PRIMARY KEY,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS session_ends_expires ON session_ends (expires_ms);
