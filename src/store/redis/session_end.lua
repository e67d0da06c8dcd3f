-- Ends a session (`rules::session::end`), leaving a tombstone. KEYS: session, tombstone. ARGV:
-- now, the session's absolute end if the caller knows it ('' otherwise: the hash's is used).
-- Returns 1 if the session was live.
return end_session(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]))
