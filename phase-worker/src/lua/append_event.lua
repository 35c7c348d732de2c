-- Appends a worker's event (phase started, output delta, retrying) to the
-- workflow's event stream, but only while the task is still the workflow's
-- current one. The first append of a workflow moves it to "running".
--
-- KEYS: 1 state hash, 2 events stream
-- ARGV: 1 phase index, 2 attempt, 3 encoded WorkflowEvent, 4 now (ms),
--       5 events channel, 6 workflow id
-- Returns 1 when appended, 0 when the task is stale (cancelled, finished or
-- moved on): the caller should stop working on it.

local state = redis.call('HMGET', KEYS[1], 'status', 'phase', 'attempt')
if (state[1] ~= 'pending' and state[1] ~= 'running') or state[2] ~= ARGV[1] or state[3] ~= ARGV[2] then
  return 0
end
if state[1] == 'pending' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'updated_ms', ARGV[4])
end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
