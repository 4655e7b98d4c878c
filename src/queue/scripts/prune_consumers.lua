-- Removes the consumers of a group that hold nothing and have been idle longer than a
-- threshold: daemons that died or were replaced (each start takes a new consumer name).
-- Checked and deleted in one script, so no entry can be handed to a consumer between the
-- check and XGROUP DELCONSUMER (which would drop its pending entries with it).
-- KEYS[1]: stream. ARGV[1]: group, ARGV[2]: idle threshold (ms), ARGV[3]: a consumer never
-- removed (the caller). Returns the number removed; 0 when the group does not exist.
local ok, list = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  return 0
end
local removed = 0
for _, c in ipairs(list) do
  local f = {}
  for i = 1, #c, 2 do
    f[c[i]] = c[i + 1]
  end
  if f.pending == 0 and f.idle > tonumber(ARGV[2]) and f.name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f.name)
    removed = removed + 1
  end
end
return removed
