-- A job back to the delayed set, or, if Redis refuses the ZADD, its end as a dead letter
-- (see recorder.rs).
-- KEYS: [1] scheduled, [2] dead, [3] events, [4] the job's idempotency record,
--       [5] campaigns, [6] the campaign's stats.
-- ARGV: [1] due (ms), [2] member, [3] job as received, [4] now (RFC 3339), [5] campaign,
--       [6] '1' when this record also counts the job (stats) already, [7] events max length.
-- Answers 0, or the reason the job died.
local ok, err = pcall(redis.call, 'ZADD', KEYS[1], ARGV[1], ARGV[2])
if ok then return 0 end
local why = type(err) == 'table' and tostring(err.err) or tostring(err)
local reason = 'could not be put back in the delayed set: ' .. why
redis.call('XADD', KEYS[2], '*', 'job', ARGV[3], 'error', reason)
local okj, job = pcall(cjson.decode, ARGV[3])
if not okj or type(job) ~= 'table' then job = {} end
local function s(v) if type(v) == 'string' then return v end return '' end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'event', cjson.encode({type = 'dead', id = s(job.id),
  campaign = s(job.campaign), to = s(job.to), at = ARGV[4], error = reason}))
redis.call('DEL', KEYS[4])
redis.call('HINCRBY', KEYS[6], 'dead', 1)
if ARGV[6] == '0' and string.sub(ARGV[2], 1, 2) == '0|' then
  redis.call('HINCRBY', KEYS[6], 'accepted', 1)
end
redis.call('SADD', KEYS[5], ARGV[5])
return reason
