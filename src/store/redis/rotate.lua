-- Spends a refresh token: the decision of `rules::rotation::step`. KEYS: family. ARGV:
-- presented, successor refresh id, successor access id, successor issued_at_ms, now,
-- replay_until, presented_revoked ('1': it never rotates or replays; spent, it is a reuse).
-- Field rt: the one retry after the grace period is used.
local f = redis.call('HMGET', KEYS[1], 'cur', 'prev', 'ru', 'sr', 'sa', 'si', 'rv', 'ex', 'rt')
local now = tonumber(ARGV[5])
if not f[1] or f[7] == '1' or tonumber(f[8]) <= now then return {'gone'} end
if ARGV[7] == '1' then
  if ARGV[1] == f[1] then return {'gone'} end
  redis.call('HSET', KEYS[1], 'rv', '1')
  return {'reused'}
end
if ARGV[1] == f[1] then
  redis.call('HSET', KEYS[1], 'cur', ARGV[2], 'prev', ARGV[1], 'ru', ARGV[6],
    'sr', ARGV[2], 'sa', ARGV[3], 'si', ARGV[4], 'rt', '0')
  return {'rotated', f[8]}
end
if f[2] and f[4] and ARGV[1] == f[2] then
  if now < tonumber(f[3]) then
    return {'replay', f[8], f[4], f[5], f[6]}
  end
  if f[9] ~= '1' then
    redis.call('HSET', KEYS[1], 'rt', '1')
    return {'replay', f[8], f[4], f[5], f[6]}
  end
end
redis.call('HSET', KEYS[1], 'rv', '1')
return {'reused'}
