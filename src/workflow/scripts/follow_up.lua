-- Adds follow-up jobs, each once per send and rule, none to a suppressed address.
-- KEYS: [1] suppressed, [2] sends, then per job its once-only marker.
-- ARGV: [1] marker TTL (s), then per job: lower-cased address, job JSON.
-- Answers per job: 2 suppressed, 1 added, 0 already sent for this rule.
local out = {}
for i = 2, #ARGV, 2 do
  local marker = KEYS[2 + i / 2]
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    out[#out + 1] = 2
  elseif redis.call('SET', marker, '1', 'NX', 'EX', tonumber(ARGV[1])) then
    redis.call('XADD', KEYS[2], '*', 'job', ARGV[i + 1])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
