-- Cancels a workflow that is still pending or running, and tells every worker
-- to abort its in-flight model call for it.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash, 4 shard approval gates zset
-- ARGV: 1 now (ms), 2 encoded cancelled event, 3 reason, 4 retention (s),
--       5 events channel, 6 cancel channel, 7 workflow id
-- Returns "cancelled", the terminal status it already had, or "missing".

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'missing'
end
if status ~= 'pending' and status ~= 'running' and status ~= 'awaiting_approval' then
  return status
end
redis.call('ZREM', KEYS[4], ARGV[7])
end_workflow(KEYS[1], KEYS[2], KEYS[3], {'status', 'cancelled', 'reason', ARGV[3]},
  ARGV[2], ARGV[4], ARGV[1], ARGV[5], ARGV[7])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 'cancelled'
