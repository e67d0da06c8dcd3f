-- ARGV: ttl_ms, unlike ('' for every node), and whether to drop what is not live ('1').
-- Returns {id, document, ...} of every live entry of the hash whose mark's digest is not
-- `unlike`, or that has no mark. Reads the whole registry: only for check-config, and for a
-- node whose digest differs from another's.
local ttl, unlike, dropping = tonumber(ARGV[1]), ARGV[2], ARGV[3] == '1'
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local node = all[i]
  local ends, document = split(all[i + 1])
  ends = tonumber(ends)
  if ends and ends > now and ends <= now + ttl then
    local mark = redis.call('HGET', KEYS[3], node)
    if unlike == '' or not mark or split(mark) ~= unlike then
      out[#out + 1] = node
      out[#out + 1] = document
    end
  elseif dropping then
    forget(node)
  end
end
return out
