-- Moves a task that cannot be run (delivered too many times, or not
-- decodable) to the dead-letter stream, and, when it names a workflow that
-- still waits for exactly this task (same phase and attempt), fails that
-- workflow with the reason, so neither the task nor the run is retried
-- forever.
--
-- KEYS: 1 dead-letter stream, 2 task stream, 3 state hash, 4 events stream,
--       5 outputs hash (3 to 5: any key of the shard when no workflow)
-- ARGV: 1 the task entry's payload, 2 workers group, 3 task entry id,
--       4 deliveries, 5 why, 6 phase index or "" for no workflow, 7 attempt,
--       8 encoded failed event, 9 now (ms), 10 events channel,
--       11 workflow id, 12 retention (s) for runs that do not carry their own
-- Returns "failed" when it failed the workflow, else "moved".

redis.call('XADD', KEYS[1], '*', 'm', ARGV[1], 'task_id', ARGV[3], 'deliveries', ARGV[4], 'reason', ARGV[5])
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
if ARGV[6] ~= '' and current_status(KEYS[3], ARGV[6], ARGV[7]) then
  end_workflow(KEYS[3], KEYS[4], KEYS[5], {'status', 'failed', 'reason', ARGV[5]},
    ARGV[8], ARGV[12], ARGV[9], ARGV[10], ARGV[11])
  return 'failed'
end
return 'moved'
