-- One GCRA step (gcra_lib.lua). KEYS: state. ARGV: interval_us, burst, lockout_us, cost, and
-- now_us (empty: the server's clock). Returns {allowed, remaining, retry_after_us,
-- reset_after_us}.
local state = gcra_read(KEYS[1])
local answer, expire_us = gcra_step(state, tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4]), gcra_now(ARGV[5]))
if expire_us then gcra_write(KEYS[1], state, expire_us) end
return answer
