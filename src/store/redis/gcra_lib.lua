-- One GCRA step: the same arithmetic as `rules::gcra::gcra`. One hash per (policy, key) holds
-- `tat` and `lock` (microseconds), so a step touches one key and works on Redis Cluster.

-- A state as stored: {tat, lock}, zeros for a key that is absent.
local function gcra_read(key)
  local stored = redis.call('HMGET', key, 'tat', 'lock')
  return {tat = tonumber(stored[1]) or 0, lock = tonumber(stored[2]) or 0}
end

-- Stores a state that a step changed, to live until `expire_us`.
local function gcra_write(key, state, expire_us)
  redis.call('HSET', key, 'tat', string.format('%d', state.tat),
    'lock', string.format('%d', state.lock))
  redis.call('PEXPIREAT', key, math.ceil(expire_us / 1000) + 1)
end

-- The step on `state` at `now`: returns {allowed, remaining, retry_after_us, reset_after_us}
-- and, when it changed `state` (in place), until when the new state must live.
local function gcra_step(state, interval, burst, lockout, cost, now)
  local tat, lock = state.tat, state.lock
  local capacity = burst * interval
  local function remaining(at)
    return math.max(0, math.min(burst, math.floor((now + capacity - at) / interval)))
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
      state.lock = until_us
      return {0, remaining(tat), lockout, math.max(tat, until_us) - now},
        math.max(tat, until_us)
    end
    return {0, remaining(tat), allow_at - now, tat - now}
  end
  if cost == 0 then
    return {1, remaining(tat), 0, tat - now}
  end
  state.tat, state.lock = new_tat, 0
  return {1, remaining(new_tat), 0, new_tat - now}, new_tat
end

-- The instant a step runs at: `at` in microseconds, or when empty the server's clock
-- (`TIME`), which is what serving uses, so the nodes' clocks do not matter.
local function gcra_now(at)
  if at ~= '' then
    return tonumber(at)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
