-- Moves a phase result that could not be applied, after too many
-- deliveries, to the shard's result dead-letter stream, and fails its
-- workflow with the reason (if it is still running), so neither the result
-- nor the run is retried forever.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash, 4 shard result stream,
--       5 shard result dead-letter stream
-- ARGV: 1 now (ms), 2 encoded failed event, 3 reason, 4 retention (s),
--       5 events channel, 6 workflow id, 7 result entry id,
--       8 orchestrators group, 9 the result's payload, 10 deliveries
-- Returns "failed", or the status the workflow already had, or "missing".

redis.call('XADD', KEYS[5], '*', 'm', ARGV[9], 'result_id', ARGV[7], 'deliveries', ARGV[10], 'reason', ARGV[3])
redis.call('XACK', KEYS[4], ARGV[8], ARGV[7])
redis.call('XDEL', KEYS[4], ARGV[7])

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'missing'
end
if status ~= 'pending' and status ~= 'running' then
  return status
end
end_workflow(KEYS[1], KEYS[2], KEYS[3], {'status', 'failed', 'reason', ARGV[3]},
  ARGV[2], ARGV[4], ARGV[1], ARGV[5], ARGV[6])
return 'failed'
