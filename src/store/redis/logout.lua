-- Logout everywhere: raises the subject's cutoff and ends its sessions, each leaving a
-- tombstone. KEYS: cutoff, index. ARGV: cutoff_ms, until_ms, session key prefix, tombstone key
-- prefix, now, then (id, absolute end) pairs of further sessions to end (tiered: those that
-- PostgreSQL ended, which Redis may not hold). Returns how many live sessions ended.
raise_cutoff(KEYS[1], ARGV[1], ARGV[2])
local now = tonumber(ARGV[5])
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  n = n + end_session(ARGV[3] .. id, ARGV[4] .. id, now, false)
end
for i = 6, #ARGV, 2 do
  n = n + end_session(ARGV[3] .. ARGV[i], ARGV[4] .. ARGV[i], now, tonumber(ARGV[i + 1]))
end
redis.call('DEL', KEYS[2])
return n
