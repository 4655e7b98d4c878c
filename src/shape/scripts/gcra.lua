local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local longest = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat > now + tolerance + longest + interval + 1000000 then
  tat = now + tolerance + longest
  redis.call('DEL', KEYS[2])
end
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait <= longest then
  if wait < 0 then wait = 0 end
  local next_tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX',
    math.floor((next_tat - now) / 1000) + 1000)
  return {1, wait}
end
local back = tonumber(redis.call('GET', KEYS[2])) or 0
local due = math.max(back, now + wait)
redis.call('SET', KEYS[2], string.format('%.0f', due + interval), 'PX',
  math.floor((due + interval - now) / 1000) + 1000)
return {0, due - now}