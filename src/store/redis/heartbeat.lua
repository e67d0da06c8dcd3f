-- ARGV: this node's id, nonce, digest, document, ttl_ms, and up to how many ids to list.
-- Drops the nodes whose time has passed (a bounded number per call), records this one, and
-- returns {live, undigested, generation, taken, ids, {digest, count, ...}}: ids only while
-- there are at most that many live nodes, and no document. `undigested` counts the live
-- entries of the hash without a mark (an older version's, or written by hand); `taken` is 1
-- when the id's mark, still live, has another nonce: another process writes under this id.
local id, nonce, digest, document = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, listed = tonumber(ARGV[5]), tonumber(ARGV[6])
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 64)) do
  forget(node)
end
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. (now + ttl), '+inf', 'LIMIT', 0, 64)) do
  forget(node)
end
local taken = 0
local mark = redis.call('HGET', KEYS[3], id)
if mark then
  local was, by = split(mark)
  if by ~= nonce then taken = 1 end
  if was ~= digest then
    count(was, -1)
    count(digest, 1)
    redis.call('INCR', KEYS[5])
  end
else
  count(digest, 1)
  redis.call('INCR', KEYS[5])
end
redis.call('HSET', KEYS[3], id, digest .. '|' .. nonce)
redis.call('ZADD', KEYS[2], now + ttl, id)
redis.call('HSET', KEYS[1], id, (now + ttl) .. '|' .. document)
-- Every part outlives its longest-lived member; never shortened by a node with a shorter ttl.
for i = 1, 5 do
  if redis.call('PTTL', KEYS[i]) < 2 * ttl then
    redis.call('PEXPIRE', KEYS[i], 2 * ttl)
  end
end
local live = redis.call('ZCARD', KEYS[2])
local ids = {}
if live <= listed then
  ids = redis.call('ZRANGE', KEYS[2], 0, -1)
end
local undigested = math.max(0, redis.call('HLEN', KEYS[1]) - live)
local generation = tonumber(redis.call('GET', KEYS[5]) or '0')
return {live, undigested, generation, taken, ids, redis.call('HGETALL', KEYS[4])}
