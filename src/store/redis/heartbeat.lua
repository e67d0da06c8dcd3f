-- The registry of live nodes: one hash, node id -> "<live until, ms>|<document>", on the
-- server's clock, so that the nodes' clocks do not matter.
-- KEYS: the hash. ARGV: this node's id ('' to only read), its document, ttl_ms.
-- Records the node, drops those whose time has passed, and returns {id, document, ...} of
-- every live node. A deadline further than ttl_ms from now (the reader's three heartbeats)
-- was not written by a node's heartbeat: it is not live, and a writer drops it, so that one
-- forged entry cannot stay for good.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local writing = ARGV[1] ~= ''
if writing then
  redis.call('HSET', KEYS[1], ARGV[1], (now + ttl) .. '|' .. ARGV[2])
  -- The hash outlives its longest-lived member; never shortened by a node with a shorter ttl.
  if redis.call('PTTL', KEYS[1]) < 2 * ttl then
    redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  end
end
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local value = all[i + 1]
  local bar = string.find(value, '|', 1, true)
  local ends = bar and tonumber(string.sub(value, 1, bar - 1))
  if ends and ends > now and ends <= now + ttl then
    live[#live + 1] = all[i]
    live[#live + 1] = string.sub(value, bar + 1)
  elseif writing then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return live
