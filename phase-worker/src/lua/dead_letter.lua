-- Moves a task that was delivered too many times to the dead-letter stream
-- and reports the phase as failed, so the workflow fails with a reason
-- instead of retrying a poison task forever.
--
-- KEYS: 1 dead-letter stream, 2 result stream, 3 task stream
-- ARGV: 1 encoded PhaseTask, 2 encoded failure PhaseResult, 3 workers group,
--       4 task entry id, 5 deliveries

redis.call('XADD', KEYS[1], '*', 'm', ARGV[1], 'task_id', ARGV[4], 'deliveries', ARGV[5])
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
return 1
