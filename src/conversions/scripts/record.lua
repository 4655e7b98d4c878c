-- Records a request's conversions (see conversions/record.rs), each exactly once.
-- KEYS: [1] events, then per conversion 5 keys: its order key (`conv:{id}`), and for an
--       attributed one its campaign's `convs:{campaign}` hash, the campaign's converted
--       people (HyperLogLog `uniq:p:{campaign}`), its variant's (`uniq:p:{campaign}:{variant}`),
--       and the campaign's revenue-experiment figures (`convx:{campaign}`); for an
--       unattributed conversion, or one without a variant, the keys before repeated.
-- ARGV: [1] how long an order id is remembered (s), [2] events max length, then per
--       conversion 12 values: '1' attributed / '0' not, the answer to remember (JSON), the
--       `converted` event (JSON), the person (lower-cased address), kind, currency ("" when
--       no value), value in minor units (integer text), link, variant, touch ("" when none),
--       the job id, and for a revenue experiment's conversion in its currency the minor
--       units per major unit ("" otherwise): the message's revenue is kept, and its
--       variant's sums of ln(1 + revenue) and of its square moved by the change.
-- Answers per conversion: "" counted now; the remembered answer when the order id was seen
-- before (a retry: nothing counted again); "!" and a reason when one of its keys holds
-- another type (nothing written for it). Every key of a conversion is checked before any of
-- its writes, so a conversion is written whole or not at all.

local function misfit(key, want)
  local t = redis.call('TYPE', key).ok
  if t == 'none' or t == want then return nil end
  return key .. ' holds a ' .. t .. ', not a ' .. want
end

-- A campaign's keys are checked once per call (a request's conversions mostly share them).
local checked = {}
local function check(key, want)
  if checked[key] == nil then checked[key] = misfit(key, want) or false end
  return checked[key] or nil
end

local bad = misfit(KEYS[1], 'stream')
if bad then return redis.error_reply('WRONGTYPE ' .. bad) end

local out = {}
local k = 2
for i = 3, #ARGV, 12 do
  local order, convs, people, vpeople, convx = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  k = k + 5
  local attributed, answer, ev, person, kind, cur, minor, link, variant, touch, job, scale =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
    ARGV[i + 7], ARGV[i + 8], ARGV[i + 9], ARGV[i + 10], ARGV[i + 11]
  local why = nil
  if attributed == '1' then
    why = check(convs, 'hash') or check(people, 'string') or check(vpeople, 'string')
    if not why and scale ~= '' then why = check(convx, 'hash') end
  end
  -- What the order key holds: a key of another type fails here, before anything of this
  -- conversion is written.
  local seen = nil
  if not why then
    seen = redis.pcall('GET', order)
    if type(seen) == 'table' and seen.err then
      why = order .. ': ' .. seen.err
    end
  end
  if why then
    table.insert(out, '!' .. why)
  elseif seen then
    table.insert(out, seen)
  else
    redis.call('SET', order, answer, 'EX', ARGV[1])
    if attributed == '1' then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', ev)
      local function add(prefix)
        redis.call('HINCRBY', convs, prefix .. 'count', 1)
        if cur ~= '' then
          redis.call('HINCRBY', convs, prefix .. 'rev:' .. cur, minor)
        end
      end
      add('')
      add('kind:' .. kind .. ':')
      if link ~= '' then add('link:' .. link .. ':') end
      if variant ~= '' then add('variant:' .. variant .. ':') end
      if touch ~= '' then add('touch:' .. touch .. ':') end
      if redis.call('PFADD', people, person) == 1 then
        redis.call('HINCRBY', convs, 'people', 1)
        if touch ~= '' then redis.call('HINCRBY', convs, 'touch:' .. touch .. ':people', 1) end
      end
      if variant ~= '' and redis.call('PFADD', vpeople, person) == 1 then
        redis.call('HINCRBY', convs, 'variant:' .. variant .. ':people', 1)
      end
      if scale ~= '' and variant ~= '' then
        local s = tonumber(scale)
        local old = tonumber(redis.call('HGET', convx, 'job:' .. job) or '0')
        local new = redis.call('HINCRBY', convx, 'job:' .. job, minor)
        local lo, ln = math.log(1 + old / s), math.log(1 + new / s)
        redis.call('HINCRBYFLOAT', convx, variant .. ':lsum', string.format('%.17g', ln - lo))
        redis.call('HINCRBYFLOAT', convx, variant .. ':lsq', string.format('%.17g', ln * ln - lo * lo))
      end
    end
    table.insert(out, '')
  end
end
return out
