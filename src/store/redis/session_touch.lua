-- A touch: `rules::session::touch`. KEYS: session. ARGV: now, new idle deadline ('' for none).
-- Returns the session's fields, or nil when it is not live at now.
local f = redis.call('HMGET', KEYS[1], 'e', 'i')
if not f[1] then return false end
local now = tonumber(ARGV[1])
if live_until(f[1], f[2]) <= now then return false end
if f[2] and f[2] ~= '' and ARGV[2] ~= '' then
  local idle = math.min(tonumber(ARGV[2]), tonumber(f[1]))
  redis.call('HSET', KEYS[1], 'i', string.format('%d', idle))
  f[2] = idle
end
redis.call('HSET', KEYS[1], 'l', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], live_until(f[1], f[2]))
return redis.call('HGETALL', KEYS[1])
