-- Moves up to ARGV[2] parked jobs of a campaign to the delayed set, due now, each with its
-- age start (first_at) moved forward by the time it was parked.
-- KEYS: [1] a campaign's parked (or held) set (score: parked at, ms), [2] scheduled.
-- ARGV: [1] now (ms), [2] how many at most.
-- Answers how many it moved.
local now = tonumber(ARGV[1])
local items = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local n = 0
for i = 1, #items, 2 do
  local m, parked = items[i], tonumber(items[i + 1])
  local a = string.find(m, '|', 1, true)
  local b = a and string.find(m, '|', a + 1, true)
  local out = m
  if b then
    local first = tonumber(string.sub(m, a + 1, b - 1)) or now
    local shifted = first + math.max(0, now - parked)
    out = string.sub(m, 1, a) .. string.format('%.0f', shifted) .. string.sub(m, b)
  end
  redis.call('ZADD', KEYS[2], now, out)
  redis.call('ZREM', KEYS[1], m)
  n = n + 1
end
return n
