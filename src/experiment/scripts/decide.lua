-- Records an experiment's decision once, whichever daemon (or `paloma experiment pick`) is
-- first, with its experiment_decided event in the same step.
-- KEYS: [1] the experiment's hash, [2] events.
-- ARGV: [1] winner, [2] how (auto | fallback | manual), [3] decided at (ms), [4] the figures
--       (JSON), [5] the event (JSON), [6] events max length.
-- Answers 1 when it recorded the decision, 0 when one was there already.
if redis.call('HSETNX', KEYS[1], 'winner', ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'how', ARGV[2], 'decided_at', ARGV[3], 'result', ARGV[4])
redis.call('HSETNX', KEYS[1], 'started', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[5])
return 1
