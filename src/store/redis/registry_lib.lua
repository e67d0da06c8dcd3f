-- The registry of live nodes, kept so that a heartbeat costs the same at any fleet size.
-- KEYS: 1 nodes: hash, id -> "<live until, ms>|<document>" (the layout older versions read
--         and write, so that nodes of both versions see each other during a rollout);
--       2 live: sorted set, id -> live until;
--       3 marks: hash, id -> "<digest>|<nonce>";
--       4 digests: hash, digest -> how many live nodes publish it;
--       5 generation: a counter, moved whenever a node joins, leaves or changes its digest.
-- Every time is on the server's clock, so that the nodes' clocks do not matter. A deadline
-- further than ttl from now (the reader's three heartbeats) was not written by a heartbeat:
-- that entry is not live.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- "<a>|<b>" -> a, b
local function split(value)
  local bar = string.find(value, '|', 1, true)
  if not bar then return nil, nil end
  return string.sub(value, 1, bar - 1), string.sub(value, bar + 1)
end

local function count(digest, by)
  if redis.call('HINCRBY', KEYS[4], digest, by) <= 0 then
    redis.call('HDEL', KEYS[4], digest)
  end
end

-- Takes `node` out of every part of the registry.
local function forget(node)
  local mark = redis.call('HGET', KEYS[3], node)
  if mark then
    count((split(mark)), -1)
    redis.call('HDEL', KEYS[3], node)
  end
  redis.call('ZREM', KEYS[2], node)
  redis.call('HDEL', KEYS[1], node)
  redis.call('INCR', KEYS[5])
end
