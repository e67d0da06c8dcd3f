-- Helpers shared by the session scripts, prepended to each of them.

-- When a session stops counting: its idle deadline ('' for none) or its absolute end.
local function live_until(expires, idle)
  if idle and idle ~= '' then return math.min(tonumber(idle), tonumber(expires)) end
  return tonumber(expires)
end

-- Sets a subject's sessions index to expire with its longest-lived member.
local function expire_index(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end

-- Ends a session: deletes it and leaves a tombstone that lives as long as the session would
-- have (`ends`, its absolute end; false when unknown), so that no copy of an older state can
-- bring it back. Returns 1 if it was live at `now`.
local function end_session(key, tombstone, now, ends)
  local f = redis.call('HMGET', key, 'e', 'i')
  local live = 0
  if f[1] then
    ends = tonumber(f[1])
    if live_until(f[1], f[2]) > now then live = 1 end
    redis.call('DEL', key)
  end
  if ends and ends > now then
    redis.call('SET', tombstone, '1', 'PXAT', string.format('%d', ends))
  end
  return live
end

-- Raises a subject's logout cutoff: the cutoff only rises and the record only lives longer
-- (`rules::session::raise`).
local function raise_cutoff(key, cutoff, until_ms)
  local old = redis.call('GET', key)
  if not old then
    redis.call('SET', key, cutoff, 'PXAT', until_ms)
    return
  end
  if tonumber(cutoff) > tonumber(old) then
    redis.call('SET', key, cutoff, 'KEEPTTL')
  end
  redis.call('PEXPIREAT', key, until_ms, 'GT')
end
