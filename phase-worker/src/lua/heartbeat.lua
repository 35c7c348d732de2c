-- Extends this worker's claim on a task while its model call runs, so the
-- task is not reclaimed from a live worker. Claims only what this consumer
-- still owns: a task already reclaimed by another worker is not taken back.
--
-- KEYS: 1 task stream, 2 workflow state hash
-- ARGV: 1 workers group, 2 task entry id, 3 this consumer, 4 phase index, 5 attempt
-- Returns 1 while the task is ours and current, 0 when the worker should stop.

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if not pending[1] or pending[1][2] ~= ARGV[3] then
  return 0
end
if not current_status(KEYS[2], ARGV[4], ARGV[5]) then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
