-- Moves a task that cannot be run (delivered too many times, or not
-- decodable) to the dead-letter stream, and, when there is one, reports the
-- phase as failed, so the workflow fails with a reason instead of retrying a
-- poison task forever.
--
-- KEYS: 1 dead-letter stream, 2 result stream, 3 task stream
-- ARGV: 1 the task entry's payload, 2 encoded failure PhaseResult or "",
--       3 workers group, 4 task entry id, 5 deliveries, 6 why

redis.call('XADD', KEYS[1], '*', 'm', ARGV[1], 'task_id', ARGV[4], 'deliveries', ARGV[5], 'reason', ARGV[6])
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
return 1
