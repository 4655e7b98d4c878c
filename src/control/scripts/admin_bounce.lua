-- Ends waiting jobs as bounced by an operator (`paloma bounce`), atomically per member: only
-- a member still in its set (no daemon moved it to the sends stream meanwhile) is removed,
-- and only then are its `bounced` event written, its job id marked done and its campaign's
-- counters counted. A job is thus either sent or bounced here, never both, and bounced once.
-- KEYS: [1] the set (delayed, parked or held), [2] events, [3] campaigns,
--       [4] campaigns:active, then per member: its job id's idempotency record, its
--       campaign's counters, its campaign's per-domain counters.
-- ARGV: [1] the events' MAXLEN ~, [2] the idempotency TTL (s), [3] now (ms), [4] most
--       per-domain fields (as the recorder's), [5] the idempotency value of an ended job,
--       then per member: the member, its event JSON, its campaign, its recipient's domain
--       ('' if none), '1' when it was never attempted (counted accepted), '1' when its job
--       has an id.
-- Answers how many it ended.
local ended = 0
local max = tonumber(ARGV[4])
local j = 0
for i = 6, #ARGV, 6 do
  local k = 4 + j * 3
  j = j + 1
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[i + 1])
    if ARGV[i + 5] == '1' then
      redis.call('SET', KEYS[k + 1], ARGV[5], 'EX', tonumber(ARGV[2]))
    end
    local c = ARGV[i + 2]
    redis.call('HINCRBY', KEYS[k + 2], 'bounced', 1)
    if ARGV[i + 4] == '1' then
      redis.call('HINCRBY', KEYS[k + 2], 'accepted', 1)
    end
    redis.call('SADD', KEYS[3], c)
    redis.call('ZADD', KEYS[4], tonumber(ARGV[3]), c)
    local d = ARGV[i + 3]
    if d ~= '' then
      local field = d .. ':bounced'
      if redis.call('HEXISTS', KEYS[k + 3], field) == 0
          and redis.call('HLEN', KEYS[k + 3]) >= max then
        field = '(other):bounced'
      end
      redis.call('HINCRBY', KEYS[k + 3], field, 1)
    end
    ended = ended + 1
  end
end
return ended
