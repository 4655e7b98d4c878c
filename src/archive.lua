-- Archives one finished campaign, if it has had no outcome since the cutoff: its counters
-- and link clicks become one JSON field of the archive (added to what an earlier archive
-- of it holds), and its keys are deleted.
-- KEYS: [1] campaigns, [2] campaigns:active, [3] campaigns:archive, [4] stats:{c},
-- [5] links:{c}, [6..] the rest of its keys (deleted).
-- ARGV: [1] campaign, [2] cutoff (ms), [3] now (ms). Answers 1 archived, 0 not (active again).
local last = redis.call('ZSCORE', KEYS[2], ARGV[1])
if last and tonumber(last) > tonumber(ARGV[2]) then
  return 0
end
local function map(key)
  local flat = redis.call('HGETALL', key)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = tonumber(flat[i + 1]) or 0
  end
  return m
end
local entry = {stats = map(KEYS[4]), links = map(KEYS[5])}
local before = redis.call('HGET', KEYS[3], ARGV[1])
if before then
  local old = cjson.decode(before)
  for _, part in ipairs({'stats', 'links'}) do
    for k, v in pairs(old[part] or {}) do
      entry[part][k] = (entry[part][k] or 0) + v
    end
  end
end
-- Empty tables encode as {} (cjson would not know an empty array from an object).
entry.archived_at = tonumber(ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(entry))
for i = 4, #KEYS do
  redis.call('DEL', KEYS[i])
end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
