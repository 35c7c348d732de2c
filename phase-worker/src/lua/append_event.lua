-- Appends a worker's event (phase started, output delta, retrying) to the
-- workflow's event stream, but only while the task is still the workflow's
-- current one. The first append of a workflow moves it to "running".
--
-- KEYS: 1 state hash, 2 events stream
-- ARGV: 1 phase index, 2 attempt, 3 encoded WorkflowEvent, 4 now (ms),
--       5 events channel, 6 workflow id
-- Returns 1 when appended, 0 when the task is stale (cancelled, finished or
-- moved on): the caller should stop working on it.

local status, state = current_status(KEYS[1], ARGV[1], ARGV[2])
if not status then
  return 0
end
append_event(KEYS[1], state, KEYS[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 1
