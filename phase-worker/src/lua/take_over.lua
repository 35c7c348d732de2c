-- Takes over a task whose worker stopped heartbeating, as a new attempt.
--
-- Claims the entry for this consumer (only if still idle, so two workers
-- cannot both take it), then, if the workflow still waits for this phase,
-- bumps its attempt: from now on only the new attempt's starts, deltas,
-- heartbeats and result pass the fence, and the old worker, if it still
-- runs, is fenced out. A task the workflow no longer needs is acknowledged
-- and deleted.
--
-- KEYS: 1 task stream, 2 workflow state hash
-- ARGV: 1 workers group, 2 this consumer, 3 min idle (ms), 4 task entry id,
--       5 the task's phase index
-- Returns {"claimed", attempt, deliveries, starts}, {"stale"} or {"gone"}
-- (another worker took it first, or it was acknowledged meanwhile). `starts`
-- is how often the phase was started (its start script ran) and did not
-- finish: what tells a poison task from one whose takers died before they
-- got to it.

local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'JUSTID')
if #claimed == 0 then
  return {'gone'}
end
local state = redis.call('HMGET', KEYS[2], 'status', 'phase')
if (state[1] ~= 'pending' and state[1] ~= 'running') or state[2] ~= ARGV[5] then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[4])
  redis.call('XDEL', KEYS[1], ARGV[4])
  return {'stale'}
end
-- JUSTID leaves the delivery counter alone; a takeover is a delivery.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1)
local deliveries = pending[1][4] + 1
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'RETRYCOUNT', deliveries, 'JUSTID')
local attempt = redis.call('HINCRBY', KEYS[2], 'attempt', 1)
local starts = redis.call('HGET', KEYS[2], 'starts') or '0'
return {'claimed', tostring(attempt), tostring(deliveries), starts}
