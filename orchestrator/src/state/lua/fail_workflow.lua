-- Moves a phase result that could not be applied, after too many
-- deliveries, to the shard's result dead-letter stream, and fails its
-- workflow with the reason if the workflow still waits for exactly that
-- result (same phase and attempt), so neither the result nor the run is
-- retried forever. A stale result is only dead-lettered.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash, 4 shard result stream,
--       5 shard result dead-letter stream
-- ARGV: 1 now (ms), 2 encoded failed event, 3 reason, 4 retention (s),
--       5 events channel, 6 workflow id, 7 result entry id,
--       8 orchestrators group, 9 the result's payload, 10 deliveries,
--       11 the result's phase index, 12 its attempt
-- Returns "failed", "stale", or "missing".

redis.call('XADD', KEYS[5], '*', 'm', ARGV[9], 'result_id', ARGV[7], 'deliveries', ARGV[10], 'reason', ARGV[3])
redis.call('XACK', KEYS[4], ARGV[8], ARGV[7])
redis.call('XDEL', KEYS[4], ARGV[7])

local state = redis.call('HMGET', KEYS[1], 'status', 'phase', 'attempt')
if not state[1] then
  return 'missing'
end
if (state[1] ~= 'pending' and state[1] ~= 'running') or state[2] ~= ARGV[11] or state[3] ~= ARGV[12] then
  return 'stale'
end
end_workflow(KEYS[1], KEYS[2], KEYS[3], {'status', 'failed', 'reason', ARGV[3]},
  ARGV[2], ARGV[4], ARGV[1], ARGV[5], ARGV[6])
return 'failed'
