-- Which of the stream entries ARGV[4..] consumer ARGV[2] of group ARGV[1] on stream KEYS[1]
-- still holds. With ARGV[3] = "renew", the held ones get their idle time reset (XCLAIM …
-- JUSTID to the same consumer), and an entry another consumer took is never taken back
-- (a plain XCLAIM would take it, whoever holds it). Returns one 1 (held) or 0 per id.
local out, args = {}, {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
    if #p > 0 then
        out[#out + 1] = 1
        args[#args + 1] = ARGV[i]
    else
        out[#out + 1] = 0
    end
end
if ARGV[3] == 'renew' and #args > 5 then
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
end
return out
