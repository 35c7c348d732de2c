-- Publishes a task's result (when there is one) and acknowledges the task in
-- one step, so a task is never acknowledged without its result.
--
-- KEYS: 1 result stream, 2 task stream
-- ARGV: 1 encoded PhaseResult or "" for none, 2 workers group, 3 task entry id

if ARGV[1] ~= '' then
  redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return 1
