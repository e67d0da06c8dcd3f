-- Writes a family's state as Validate reads it: a create, or a copy of PostgreSQL's (tiered).
-- Monotone: a family only goes from live to revoked; a copy never makes a revoked one live.
-- KEYS: family. ARGV: subject, current, revoked ('1' or '0'), expires_ms.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'sub', ARGV[1], 'cur', ARGV[2], 'rv', ARGV[3], 'ex', ARGV[4])
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
elseif ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'rv', '1')
end
return 1
