-- Starts a task: if it is still the workflow's current one, appends "phase
-- started" (moving a pending workflow to running) and returns the stored
-- outputs the phase's prompt reads, all in one round trip.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash
-- ARGV: 1 phase index, 2 attempt, 3 encoded PhaseStarted event, 4 now (ms),
--       5 events channel, 6 workflow id, 7.. names of the inputs to return
-- Returns {"1", cost cap (USD, "0" for none), spent so far (USD), tenant
-- ("" for none), input values...} when started, {"0"} when the task is stale.

local status, state = current_status(KEYS[1], ARGV[1], ARGV[2], 'budget_usd', 'spent_usd', 'tenant')
if not status then
  return {'0'}
end
append_event(KEYS[1], status, KEYS[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
-- Counted for poison detection (reset when the run moves to its next phase).
redis.call('HINCRBY', KEYS[1], 'starts', 1)
local reply = {'1', state[4] or '0', state[5] or '0', state[6] or ''}
if #ARGV >= 7 then
  local inputs = redis.call('HMGET', KEYS[3], unpack(ARGV, 7))
  for i = 1, #ARGV - 6 do
    reply[#reply + 1] = inputs[i] or ''
  end
end
return reply
