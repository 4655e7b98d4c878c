-- Counts a batch's outcomes per recipient domain of one campaign, for the campaign report
-- (a blocking provider stands out). At most ARGV[1] domain fields: a domain not yet counted
-- once the hash is full is counted under "(other)", so a campaign to a million domains keeps
-- a bounded hash. One HLEN per batch and one HINCRBY per field: HINCRBY answering the count
-- it added means the field is new (counts only grow), so the size is tracked here, and
-- HEXISTS is asked only once the hash is full.
-- KEYS: [1] the campaign's per-domain counters.
-- ARGV: [1] most fields, then triples: domain, outcome, count.
local max = tonumber(ARGV[1])
local fields = redis.call('HLEN', KEYS[1])
for i = 2, #ARGV, 3 do
  local field = ARGV[i] .. ':' .. ARGV[i + 1]
  local n = tonumber(ARGV[i + 2])
  if fields >= max and redis.call('HEXISTS', KEYS[1], field) == 0 then
    field = '(other):' .. ARGV[i + 1]
  end
  if redis.call('HINCRBY', KEYS[1], field, n) == n then
    fields = fields + 1
  end
end
return 0
