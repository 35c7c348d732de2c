-- Starts a task: if it is still the workflow's current one, appends "phase
-- started" (moving a pending workflow to running) and returns the stored
-- outputs the phase's prompt reads, all in one round trip.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash
-- ARGV: 1 phase index, 2 attempt, 3 encoded PhaseStarted event, 4 now (ms),
--       5 events channel, 6 workflow id, 7.. names of the inputs to return
-- Returns {"1", cost cap (USD, "0" for none), spent so far (USD), tenant
-- ("" for none), input values...} when started, {"0"} when the task is stale.

local inputs = {}
for i = 7, #ARGV do
  inputs[#inputs + 1] = ARGV[i]
end
local started = start_current(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6], inputs)
if not started then
  return {'0'}
end
table.insert(started, 1, '1')
return started
