-- How many marketing messages each recipient of a batch was sent in the months asked: one
-- call per batch instead of an HMGET of every month per job, so a claim costs one reply per
-- recipient, not one per recipient and month.
-- KEYS: the recipients' hashes, in the batch's order.
-- ARGV: the month fields (`t:YYYYMM`).
-- Returns: one sum per key, in order. A key that is not a hash (written by another tool)
-- counts 0 rather than failing the batch's claim.
local sums = {}
for i, key in ipairs(KEYS) do
  local n = 0
  local values = redis.pcall('HMGET', key, unpack(ARGV))
  if not values.err then
    for _, v in ipairs(values) do
      if v then
        n = n + (tonumber(v) or 0)
      end
    end
  end
  sums[i] = n
end
return sums
