-- Takes the entries of a consumer group idle longer than ARGV[3] ms (a stopped or frozen
-- consumer's), at most ARGV[4], for consumer ARGV[2] of group ARGV[1] on stream KEYS[1],
-- as XAUTOCLAIM from the start would, and bumps the fence `{stream}:fence:{owner}` of
-- every other consumer it took entries from. The recorder of that consumer watches its
-- fence: an outcome it writes after waking is refused for what it no longer holds.
-- Returns XAUTOCLAIM's shape: {cursor (always "0-0"), entries, ids deleted meanwhile}.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
if #pending == 0 then
    return {'0-0', {}, {}}
end
local ids, owners = {}, {}
for _, p in ipairs(pending) do
    ids[#ids + 1] = p[1]
    if p[2] ~= ARGV[2] then
        owners[p[2]] = true
    end
end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids))
for owner in pairs(owners) do
    local fence = KEYS[1] .. ':fence:' .. owner
    redis.call('INCR', fence)
    redis.call('EXPIRE', fence, 86400)
end
-- Entries deleted from the stream are left out of XCLAIM's reply (and dropped from the
-- pending list, Redis 7), or come back as nil.
local got, entries = {}, {}
for _, e in ipairs(claimed) do
    if e and e ~= false and type(e) == 'table' and e[2] then
        got[e[1]] = true
        entries[#entries + 1] = e
    end
end
local gone = {}
for _, id in ipairs(ids) do
    if not got[id] then
        gone[#gone + 1] = id
    end
end
return {'0-0', entries, gone}
