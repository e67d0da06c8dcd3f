-- One GCRA step: the same arithmetic as `rules::gcra::gcra`. One hash per (policy, key) holds
-- `tat` and `lock` (microseconds), so a step touches one key and works on Redis Cluster.
-- KEYS: state. ARGV: interval_us, burst, lockout_us, cost, and now_us; an empty now_us means
-- the server's clock (`TIME`), which is what serving uses, so the nodes' clocks do not matter.
-- Returns {allowed, remaining, retry_after_us, reset_after_us}.
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local lockout, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tat', 'lock')
local tat = tonumber(state[1]) or 0
local lock = tonumber(state[2]) or 0
local capacity = burst * interval
local function remaining(at)
  return math.max(0, math.min(burst, math.floor((now + capacity - at) / interval)))
end
local function expire_at(us)
  redis.call('PEXPIREAT', KEYS[1], math.ceil(us / 1000) + 1)
end
if lock > now then
  return {0, 0, lock - now, math.max(tat, lock) - now}
end
if tat < now then tat = now end
local new_tat = tat + math.max(cost, 1) * interval
local allow_at = new_tat - capacity
if now < allow_at then
  if lockout > 0 and cost > 0 then
    local until_us = now + lockout
    redis.call('HSET', KEYS[1], 'lock', string.format('%d', until_us))
    expire_at(math.max(tat, until_us))
    return {0, remaining(tat), lockout, math.max(tat, until_us) - now}
  end
  return {0, remaining(tat), allow_at - now, tat - now}
end
if cost == 0 then
  return {1, remaining(tat), 0, tat - now}
end
redis.call('HSET', KEYS[1], 'tat', string.format('%d', new_tat), 'lock', '0')
expire_at(new_tat)
return {1, remaining(new_tat), 0, new_tat - now}
