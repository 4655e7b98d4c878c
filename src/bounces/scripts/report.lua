-- Records one report about one job, once (a DSN retried after a 4xx is not counted twice).
-- KEYS: [1] the report's once-only marker, [2] events, [3] the campaign's stats,
--       [4] suppressed, [5] campaigns, [6] the campaign's per-variant counters, [7] its
--       per-touch counters.
-- ARGV: [1] marker TTL (s), [2] event JSON, [3] events max length, [4] stats fields,
--       comma-separated, [5] lower-cased address, [6] suppression reason or '',
--       [7] campaign, [8] the job's variant or '', [9] its touch bucket or ''.
-- Answers 1 recorded, 0 already recorded.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
for f in string.gmatch(ARGV[4], '[^,]+') do
  redis.call('HINCRBY', KEYS[3], f, 1)
  if ARGV[8] ~= '' then
    redis.call('HINCRBY', KEYS[6], ARGV[8] .. ':' .. f, 1)
  end
  if ARGV[9] ~= '' then
    redis.call('HINCRBY', KEYS[7], ARGV[9] .. ':' .. f, 1)
  end
end
redis.call('SADD', KEYS[5], ARGV[7])
local reason = ARGV[6]
if reason == 'complained' then
  -- Stronger than an opt-out for marketing; a hard bounce (which blocks all mail) stays.
  local cur = redis.call('HGET', KEYS[4], ARGV[5])
  if cur ~= 'bounced' and cur ~= 'manual' then
    redis.call('HSET', KEYS[4], ARGV[5], 'complained')
  end
elseif reason ~= '' then
  redis.call('HSETNX', KEYS[4], ARGV[5], reason)
end
return 1
