-- Writes a batch of tracking events (see server.rs, write_events).
-- KEYS: [1] suppressed, [2] events, [3] dead letters, then per event 8 keys: the campaign's stats, its
--       unique opens or clicks (by kind), its links, the link's unique clicks, the
--       recipient's hash, the campaign's per-variant counters, its per-touch counters, its
--       people's opens and clicks per hour.
-- ARGV: [1] now (unix s), [2] events max length, then per event 9 values: address, event
--       JSON, kind (o|c), job id, link ("" if none), '1' when a machine made the request,
--       the job's experiment variant ("" if none), its touch bucket ("" if none), and for a
--       person's click on a marketing message the recipient's new `last_human_click`
--       (track::clickid::LastClick, what conversions by address attribute to; "" if none).
-- Answers a code per event: 0 not recorded (opted out), 1 recorded, 2 recorded and the first
-- by a person for that send, -1 not recorded because one of its keys holds another type
-- (another tool wrote there): that event goes to the dead letters with the reason, and the
-- rest of the batch is written. Every key is checked before anything is written, so an
-- event is written whole or not at all; a batch key of the wrong type fails the batch
-- before any write (WRONGTYPE), and the writer bounds its retries of that.

-- Why `key` cannot be used as a `want` (hash, stream, or hll: a HyperLogLog string), or nil.
local function misfit(key, want)
  local t = redis.call('TYPE', key).ok
  if t == 'none' then return nil end
  if want == 'hll' then
    if t ~= 'string' then return key .. ' holds a ' .. t .. ', not a HyperLogLog' end
    -- A HyperLogLog is a string that starts with its magic (PFCOUNT would recount it).
    if redis.call('GETRANGE', key, 0, 3) ~= 'HYLL' then
      return key .. ' holds a string, not a HyperLogLog'
    end
    return nil
  end
  if t ~= want then return key .. ' holds a ' .. t .. ', not a ' .. want end
  return nil
end

local bad = misfit(KEYS[1], 'hash') or misfit(KEYS[2], 'stream')
if bad then return redis.error_reply('WRONGTYPE ' .. bad) end

local codes = {}
local k = 4
for i = 3, #ARGV, 9 do
  local addr, ev, kind, id, link, machine, variant, touch, last_click =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7],
    ARGV[i + 8]
  local stats, uniq, links, uniq_link, recipient, variants, touches, timeline =
    KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6], KEYS[k + 7]
  k = k + 8
  local why = misfit(stats, 'hash') or misfit(uniq, 'hll') or misfit(links, 'hash')
    or misfit(uniq_link, 'hll') or misfit(recipient, 'hash') or misfit(variants, 'hash')
    or misfit(touches, 'hash') or misfit(timeline, 'hash')
  local reason = redis.call('HGET', KEYS[1], addr)
  local code = 0
  if why then
    code = -1
    redis.call('XADD', KEYS[3], '*', 'event', ev, 'error', why)
  elseif reason ~= 'unsubscribed' and reason ~= 'complained' then
    code = 1
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', ev)
    local what = (kind == 'o') and 'opened' or 'clicked'
    if machine == '1' then
      redis.call('HINCRBY', stats, what .. '_machine', 1)
      if variant ~= '' then
        redis.call('HINCRBY', variants, variant .. ':' .. what .. '_machine', 1)
      end
    else
      redis.call('HINCRBY', stats, what, 1)
      redis.call('HINCRBY', timeline, math.floor(tonumber(ARGV[1]) / 3600) .. ':' .. what, 1)
      if redis.call('PFADD', uniq, id) == 1 then
        redis.call('HINCRBY', stats, 'unique_' .. what, 1)
        if variant ~= '' then
          redis.call('HINCRBY', variants, variant .. ':unique_' .. what, 1)
        end
        if touch ~= '' then
          redis.call('HINCRBY', touches, touch .. ':unique_' .. what, 1)
        end
        code = 2
      end
      if kind == 'c' and link ~= '' then
        redis.call('HINCRBY', links, link, 1)
        if redis.call('PFADD', uniq_link, id) == 1 then
          redis.call('HINCRBY', links, link .. ':unique', 1)
        end
      end
      redis.call('HSET', recipient, (kind == 'o') and 'last_open' or 'last_click', ARGV[1])
      if last_click ~= '' then
        redis.call('HSET', recipient, 'last_human_click', last_click)
      end
    end
  end
  table.insert(codes, code)
end
return codes
