-- Counts a batch's outcomes per recipient domain of one campaign, for the campaign report
-- (a blocking provider stands out). At most ARGV[1] fields: a domain not yet counted once
-- the hash is full is counted under "(other)", so a campaign to a million domains keeps a
-- bounded hash.
-- KEYS: [1] the campaign's per-domain counters.
-- ARGV: [1] most fields, then triples: domain, outcome, count.
local max = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local field = ARGV[i] .. ':' .. ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[1], field) == 0 and redis.call('HLEN', KEYS[1]) >= max then
    field = '(other):' .. ARGV[i + 1]
  end
  redis.call('HINCRBY', KEYS[1], field, tonumber(ARGV[i + 2]))
end
return 0
