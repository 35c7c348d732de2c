-- Closes an approval gate for good: the run fails with the person's (or the
-- timeout's) reason. Only while the run waits at that very phase.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash, 4 shard approval gates zset
-- ARGV: 1 gated phase index, 2 now (ms), 3 encoded failed event, 4 reason,
--       5 retention (s) for runs that do not carry their own, 6 events
--       channel, 7 workflow id
-- Returns "rejected", or the status the run has instead (as approve_step).

local refused = not_waiting_at(KEYS[1], ARGV[1])
if refused then
  return refused
end
redis.call('HDEL', KEYS[1], 'gate', 'gate_task', 'gate_deadline_ms', 'gate_on_timeout')
redis.call('ZREM', KEYS[4], ARGV[7])
end_workflow(KEYS[1], KEYS[2], KEYS[3], {'status', 'failed', 'reason', ARGV[4]},
  ARGV[3], ARGV[5], ARGV[2], ARGV[6], ARGV[7])
return 'rejected'
