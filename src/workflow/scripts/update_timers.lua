local out = {}
for i = 3, #ARGV, 2 do
  local m = ARGV[i + 1]
  if ARGV[i] == '-' then
    out[#out + 1] = redis.call('ZREM', KEYS[1], m)
    redis.call('ZADD', KEYS[2], ARGV[2], m)
  elseif redis.call('ZSCORE', KEYS[2], m) then
    out[#out + 1] = 0
  else
    out[#out + 1] = redis.call('ZADD', KEYS[1], 'NX', ARGV[i], m)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
return out