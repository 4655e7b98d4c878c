-- Counts a batch's delivered marketing messages in their recipients' month counters, and keeps
-- each hash another ARGV[2] seconds: one call per batch instead of two commands per message.
-- KEYS: the recipients' hashes, one per delivered message (a key twice counts twice).
-- ARGV: [1] the month field (`t:YYYYMM`), [2] seconds to keep the hash.
-- A key that is not a hash (written by another tool) is skipped, not the rest of the batch.
for _, key in ipairs(KEYS) do
  if type(redis.pcall('HINCRBY', key, ARGV[1], 1)) == 'number' then
    redis.call('EXPIRE', key, ARGV[2])
  end
end
return 0
