-- Hands a task back when its worker stops before finishing it (the drain
-- after SIGTERM ran out): a copy goes back on the stream for any worker to
-- read at once, and this worker's entry is acknowledged. Without this, the
-- task would wait out the visibility timeout before another worker took it.
--
-- Only the consumer that holds the task may hand it back. The copy carries
-- the current attempt, so the fence admits whoever takes it, and the start
-- this worker made is not counted against the task: a clean stop is not a
-- crash, and poison detection counts starts.
--
-- KEYS: 1 shard task stream, 2 state hash
-- ARGV: 1 workers group, 2 task entry id, 3 this consumer, 4 phase index,
--       5 attempt, 6 encoded PhaseTask to queue again
-- Returns "handed_back", "settled" (no longer needed: only acknowledged) or
-- "not_ours" (taken over meanwhile: nothing touched).

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if not pending[1] or pending[1][2] ~= ARGV[3] then
  return 'not_ours'
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if not current_status(KEYS[2], ARGV[4], ARGV[5]) then
  return 'settled'
end
local starts = tonumber(redis.call('HGET', KEYS[2], 'starts') or '0')
if starts > 0 then
  redis.call('HINCRBY', KEYS[2], 'starts', -1)
end
redis.call('XADD', KEYS[1], '*', 'm', ARGV[6])
return 'handed_back'
