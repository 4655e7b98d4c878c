local removed, kept = 0, 0
for _, a in ipairs(ARGV) do
  local reason = redis.call('HGET', KEYS[1], a)
  if reason and reason ~= 'unsubscribed' and redis.call('HEXISTS', KEYS[2], a) == 1 then
    redis.call('HSET', KEYS[1], a, 'unsubscribed')
    kept = kept + 1
  elseif reason then
    redis.call('HDEL', KEYS[1], a)
    redis.call('HDEL', KEYS[2], a)
    removed = removed + 1
  end
end
return {removed, kept}