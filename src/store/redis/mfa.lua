-- One subject's second factor, in one hash (KEYS[1]), so that every step is one atomic script
-- on a cluster too. Fields: p, pu (a pending enrollment's sealed secret and end, ms);
-- s, e (the enrolled sealed secret and when, ms); l (the last TOTP step accepted);
-- b (backup code hashes, space-separated). With nothing enrolled the key ends with the
-- pending enrollment. ARGV[1] names the step; the Rust store (`mfa_*`) documents each.
local key, op = KEYS[1], ARGV[1]

if op == 'begin' then -- sealed, until
  redis.call('HSET', key, 'p', ARGV[2], 'pu', ARGV[3])
  if redis.call('HEXISTS', key, 's') == 0 then
    redis.call('PEXPIREAT', key, ARGV[3])
  end
  return 1
end

if op == 'confirm' then -- sealed, now, step, hashes, reseal ('' for none)
  local p = redis.call('HMGET', key, 'p', 'pu')
  if p[1] ~= ARGV[2] or tonumber(p[2]) <= tonumber(ARGV[3]) then
    return 0
  end
  local secret = ARGV[2]
  if ARGV[6] ~= '' then
    secret = ARGV[6]
  end
  redis.call('HDEL', key, 'p', 'pu')
  redis.call('HSET', key, 's', secret, 'e', ARGV[3], 'l', ARGV[4], 'b', ARGV[5])
  redis.call('PERSIST', key)
  return 1
end

if op == 'accept' then -- sealed, step, reseal ('' for none): 0 not enrolled, 1 replayed, 2 accepted
  local v = redis.call('HMGET', key, 's', 'l')
  if v[1] ~= ARGV[2] then
    return 0
  end
  if tonumber(v[2]) >= tonumber(ARGV[3]) then
    return 1
  end
  redis.call('HSET', key, 'l', ARGV[3])
  if ARGV[4] ~= '' then
    redis.call('HSET', key, 's', ARGV[4])
  end
  return 2
end

if op == 'spend' then -- candidate hashes...: how many are left, or -1
  local v = redis.call('HMGET', key, 's', 'b')
  if not v[1] then
    return -1
  end
  local wanted = {}
  for i = 2, #ARGV do
    wanted[ARGV[i]] = true
  end
  local left, found = {}, false
  for h in string.gmatch(v[2] or '', '%S+') do
    if wanted[h] then
      found = true
    else
      left[#left + 1] = h
    end
  end
  if not found then
    return -1
  end
  redis.call('HSET', key, 'b', table.concat(left, ' '))
  return #left
end

if op == 'backup' then -- hashes: 1 when enrolled
  if redis.call('HEXISTS', key, 's') == 0 then
    return 0
  end
  redis.call('HSET', key, 'b', ARGV[2])
  return 1
end

if op == 'disable' then -- now: 1 when something live was there
  local v = redis.call('HMGET', key, 's', 'pu')
  redis.call('DEL', key)
  if v[1] or (v[2] and tonumber(v[2]) > tonumber(ARGV[2])) then
    return 1
  end
  return 0
end

return redis.error_reply('mfa.lua: unknown step ' .. tostring(op))
