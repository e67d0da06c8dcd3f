-- Records a revocation until an absolute instant, extending an existing record's lifetime but
-- never shortening it: a revocation only adds. Returns 1 when the token was not revoked before.
-- KEYS: revoked. ARGV: until_ms.
if redis.call('SET', KEYS[1], '1', 'NX', 'PXAT', ARGV[1]) then
  return 1
end
redis.call('PEXPIREAT', KEYS[1], ARGV[1], 'GT')
return 0
