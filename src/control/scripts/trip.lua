-- A guard pauses a campaign, once: only when it has no state yet (active), so of several
-- daemons that see the same figures one writes the event.
-- KEYS: [1] campaign_states, [2] events, [3] campaign_states:v. ARGV: [1] campaign, [2] campaign_paused event JSON,
-- [3] events max length. Answers 1 paused, 0 already paused or cancelled.
if redis.call('HSETNX', KEYS[1], ARGV[1], 'paused') == 0 then
  return 0
end
redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
return 1
