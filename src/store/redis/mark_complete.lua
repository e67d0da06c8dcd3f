-- Sets the tiered completeness marker only if the refill's ticket survived: a loss of data, or
-- a failed mirror write (which deletes both keys), since the refill began takes the ticket.
-- KEYS: filling, complete. ARGV: ticket, ttl_ms.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
redis.call('DEL', KEYS[1])
return 1
