-- Moves due jobs from the delayed set back to the sends stream, atomically per member, so
-- any number of daemons can run it: a member another daemon already moved is skipped.
-- KEYS: [1] scheduled, [2] sends, then per member its job id's idempotency record.
-- ARGV: [1] the in-progress prefix of an idempotency value, [2] its TTL (s), then per
--       member: the member (`attempt|first_at|job`), '1' when its job has an id.
-- The reason a member waited (`#x` at the end of its attempt field) stays behind.
-- Answers how many it moved.
local moved = 0
for i = 3, #ARGV, 2 do
  local m = ARGV[i]
  if redis.call('ZREM', KEYS[1], m) == 1 then
    local a = string.find(m, '|', 1, true)
    local b = a and string.find(m, '|', a + 1, true)
    if b then
      local attempt = string.sub(m, 1, a - 1)
      local h = string.find(attempt, '#', 1, true)
      if h then
        attempt = string.sub(attempt, 1, h - 1)
      end
      local eid = redis.call('XADD', KEYS[2], '*', 'job', string.sub(m, b + 1),
        'attempt', attempt, 'first_at', string.sub(m, a + 1, b - 1))
      if ARGV[i + 1] == '1' then
        redis.call('SET', KEYS[2 + (i - 1) / 2], ARGV[1] .. eid, 'EX', tonumber(ARGV[2]))
      end
      moved = moved + 1
    end
  end
end
return moved
