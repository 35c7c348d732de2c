-- Opens an approval gate: records a person's edit of the gated phase's
-- output (when there is one), appends the approved event and queues the
-- next phase's task, which waited in the state hash. Only while the run
-- waits at that very phase, so a second approval, a late timeout or an
-- approval after a cancel changes nothing.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash, 4 shard task stream,
--       5 shard approval gates zset
-- ARGV: 1 gated phase index, 2 now (ms), 3 encoded approved event,
--       4 events channel, 5 workflow id, 6 "1" when the output was edited,
--       7 phase name, 8 edited output, 9 encoded Phase record with the edit
-- Returns "approved", or the status the run has instead ("missing" when it
-- does not exist; "awaiting_approval:<index>" when it waits elsewhere).

local refused = not_waiting_at(KEYS[1], ARGV[1])
if refused then
  return refused
end
local next_task = redis.call('HGET', KEYS[1], 'gate_task')
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[3], ARGV[7], ARGV[8])
  redis.call('HSET', KEYS[1], 'phase:' .. ARGV[1], ARGV[9])
end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_ms', ARGV[2])
redis.call('HDEL', KEYS[1], 'gate', 'gate_task', 'gate_deadline_ms', 'gate_on_timeout')
redis.call('ZREM', KEYS[5], ARGV[5])
redis.call('XADD', KEYS[4], '*', 'm', next_task)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 'approved'
