-- A key of another type than a hash (another tool wrote there) is answered with its type,
-- before anything is written: the job is dead-lettered with that reason, the batch goes on.
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then
  return 'wrongtype:' .. kind
end
local now, keep, tag = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local kept = {}
for entry in string.gmatch(redis.call('HGET', KEYS[1], 's') or '', '[^,]+') do
  local t, g = string.match(entry, '^(%d+):(.*)$')
  t = tonumber(t)
  if t and t > now - keep then
    if g == tag then return 1 end
    table.insert(kept, {t, entry})
  end
end
for i = 4, #ARGV, 2 do
  local max, per = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local c = 0
  for _, e in ipairs(kept) do if e[1] > now - per then c = c + 1 end end
  if c >= max then return 0 end
end
local out = {}
for _, e in ipairs(kept) do table.insert(out, e[2]) end
table.insert(out, now .. ':' .. tag)
redis.call('HSET', KEYS[1], 's', table.concat(out, ','))
redis.call('EXPIRE', KEYS[1], math.max(keep, 34560000))
return 1
