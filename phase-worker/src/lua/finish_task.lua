-- Publishes a task's result (when there is one) and acknowledges the task in
-- one step, so a task is never acknowledged without its result. The last
-- piece of streamed output, if any, is appended to the workflow's events in
-- the same step (fenced like every worker append), saving a round trip
-- between the model's last token and the next phase.
--
-- Only the consumer that holds the task may settle it: a worker whose task
-- was taken over (a new attempt) touches nothing, so it can neither publish
-- a stale result nor acknowledge the entry from under its new owner. A
-- result is published only while its attempt is the workflow's current one.
--
-- KEYS: 1 result stream, 2 task stream, 3 workflow state hash, 4 events stream
-- ARGV: 1 encoded PhaseResult or "" for none, 2 workers group, 3 task entry id,
--       4 encoded final delta event or "", 5 phase index, 6 attempt,
--       7 events channel, 8 workflow id, 9 this consumer
-- Returns 1 when settled, 0 when the task is no longer this consumer's.

local pending = redis.call('XPENDING', KEYS[2], ARGV[2], ARGV[3], ARGV[3], 1)
if not pending[1] or pending[1][2] ~= ARGV[9] then
  return 0
end
local status = current_status(KEYS[3], ARGV[5], ARGV[6])
if status then
  if ARGV[4] ~= '' then
    append_event(KEYS[3], 'running', KEYS[4], ARGV[4], nil, ARGV[7], ARGV[8])
  end
  if ARGV[1] ~= '' then
    redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
  end
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return 1
