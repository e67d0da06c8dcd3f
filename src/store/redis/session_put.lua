-- Writes a session: a create, or a copy of PostgreSQL's state (tiered: a touch's mirror, a
-- refill). Monotone: an ended session (its tombstone present) stays ended, and a state older
-- than the one held (by last_seen) is not written over the newer one. The hash expires when the
-- session stops being live; the subject's index scores it by its absolute end.
-- KEYS: session, index, tombstone. ARGV: id, subject, created, expires, last_seen, idle ('' for
-- none), metadata, now. Returns 1 when written.
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local held = redis.call('HGET', KEYS[1], 'l')
if held and tonumber(held) > tonumber(ARGV[5]) then return 0 end
local live = live_until(ARGV[4], ARGV[6])
if live <= tonumber(ARGV[8]) then return 0 end
redis.call('HSET', KEYS[1], 's', ARGV[2], 'c', ARGV[3], 'e', ARGV[4], 'l', ARGV[5],
  'i', ARGV[6], 'm', ARGV[7])
redis.call('PEXPIREAT', KEYS[1], live)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[8])
expire_index(KEYS[2])
return 1
