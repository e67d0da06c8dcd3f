-- A subject's live sessions, pruning ids whose session is gone. The session keys share the
-- index's hash tag (ARGV[2] is their common prefix), so they live on the same node.
-- KEYS: index. ARGV: now, session key prefix.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local fields = redis.call('HGETALL', ARGV[2] .. id)
  if #fields == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    table.insert(out, id)
    table.insert(out, fields)
  end
end
return out
