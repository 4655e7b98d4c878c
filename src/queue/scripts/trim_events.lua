-- Retention of the events stream: drops entries older than the age cutoff and those past
-- the newest `max_len`, but never one the workflow group still needs (its oldest pending
-- entry, or what follows its last-delivered id). Atomic, so it reads the group's position
-- and trims in one step; any number of daemons may run it.
--
-- KEYS[1] events stream
-- ARGV[1] age cutoff (an id: entries below it are old), ARGV[2] max_len,
-- ARGV[3] the workflow group ('' when workflows are off), ARGV[4] most entries removed for
-- the length bound in one call (the rest next call: no long pause of the server)
--
-- Returns {removed, held_entries, first, lost, more}: held_entries are kept past max_len
-- because the group has not read them; first is the oldest entry's id afterwards ('' when
-- empty); lost are entries the group never read that are gone (trimmed by the hard bound
-- of the writes); more = 1 when the length bound was cut short by ARGV[4].
local key = KEYS[1]

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

-- a < b, for stream ids
local function before(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end

local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then
      return flat[i + 1]
    end
  end
  return nil
end

local floor = nil
local lost = 0
if ARGV[3] ~= '' then
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if type(groups) == 'table' and not groups.err then
    for _, g in ipairs(groups) do
      if field(g, 'name') == ARGV[3] then
        local last = field(g, 'last-delivered-id')
        floor = last
        if field(g, 'pending') > 0 then
          local p = redis.call('XPENDING', key, ARGV[3])
          if p[2] and before(p[2], floor) then
            floor = p[2]
          end
        end
        -- Unread entries already gone: everything in the stream is after `last`, and
        -- the group's count of entries read says how many were added before them.
        local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
        local read = field(g, 'entries-read')
        if type(read) ~= 'number' and last == '0-0' then
          read = 0 -- made on an empty stream, never read since
        end
        if first[1] and before(last, first[1][1]) and type(read) == 'number' then
          local info = redis.call('XINFO', 'STREAM', key)
          local added = field(info, 'entries-added')
          local len = field(info, 'length')
          if type(added) == 'number' then
            lost = math.max(0, added - read - len)
          end
        end
      end
    end
  end
end

local removed = 0
local cutoff = ARGV[1]
if floor and before(floor, cutoff) then
  cutoff = floor
end
removed = removed + redis.call('XTRIM', key, 'MINID', cutoff)

local held = 0
local more = 0
local excess = redis.call('XLEN', key) - tonumber(ARGV[2])
if excess > 0 then
  if not floor then
    -- Nothing to protect: whole stream nodes, as cheap as a write's own trimming.
    removed = removed + redis.call('XTRIM', key, 'MAXLEN', '~', ARGV[2])
  else
    local n = math.min(excess, tonumber(ARGV[4]))
    local upto = {}
    if floor ~= '0-0' then
      upto = redis.call('XRANGE', key, '-', '(' .. floor, 'COUNT', n)
    end
    if #upto > 0 then
      local ms, seq = parse(upto[#upto][1])
      removed = removed + redis.call('XTRIM', key, 'MINID', ms .. '-' .. (seq + 1))
    end
    if #upto < n then
      held = excess - #upto
    elseif n < excess then
      more = 1
    end
  end
end

local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
return {removed, held, first[1] and first[1][1] or '', lost, more}
