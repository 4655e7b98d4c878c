if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then
  redis.call('HSETNX', KEYS[1], ARGV[1], 'unsubscribed')
  return 0
end
local reason = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
-- Suppressed as unsubscribed before opt-outs were kept apart: already recorded.
if reason == 'unsubscribed' then
  return 0
end
if not reason then
  redis.call('HSET', KEYS[1], ARGV[1], 'unsubscribed')
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'unsubscribed', 1)
if ARGV[5] ~= '' then
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. ':unsubscribed', 1)
end
if ARGV[6] ~= '' then
  redis.call('HINCRBY', KEYS[6], ARGV[6] .. ':unsubscribed', 1)
end
return 1