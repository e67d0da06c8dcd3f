-- Many GCRA steps (gcra_lib.lua) in one call, in the order given, each exactly as it would
-- run alone: `store::batch` gathers them. KEYS: one state per step (a key may repeat; on a
-- cluster all in one slot). ARGV: five per step, as rate_limit.lua takes them. Returns four
-- numbers per step, as rate_limit.lua does; a step whose key holds another type answers
-- {-1, 0, 0, 0} and leaves the others be.
--
-- Each key is read once, its state carried from step to step in the script, and written once
-- at the end if a step changed it, to live as long as the last change says: what the steps
-- one by one would leave. The server's clock is read once: steps that run at one instant,
-- one after another, are a valid order of steps that arrived together.
local out, states, expires, changed = {}, {}, {}, {}
local server_now
for i = 1, #KEYS do
  local key, a = KEYS[i], (i - 1) * 5
  local state = states[key]
  if state == nil then
    local ok, read = pcall(gcra_read, key)
    state = ok and read or false
    states[key] = state
  end
  local answer = {-1, 0, 0, 0}
  if state then
    local now
    if ARGV[a + 5] ~= '' then
      now = tonumber(ARGV[a + 5])
    else
      server_now = server_now or gcra_now('')
      now = server_now
    end
    local expire_us
    answer, expire_us = gcra_step(state, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
      tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), now)
    if expire_us then
      if not expires[key] then changed[#changed + 1] = key end
      expires[key] = expire_us
    end
  end
  for j = 1, 4 do out[#out + 1] = answer[j] end
end
for _, key in ipairs(changed) do
  gcra_write(key, states[key], expires[key])
end
return out
