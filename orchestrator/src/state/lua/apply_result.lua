-- Applies one phase result exactly once and acknowledges it.
--
-- Fenced by (phase, attempt): a result for any other phase or attempt, or for
-- a workflow that is no longer running, changes nothing. The result entry is
-- acknowledged and deleted in the same step, so a crash of the orchestrator
-- after this script leaves nothing to apply twice.
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash, 4 shard task stream,
--       5 shard result stream
-- ARGV: 1 phase index, 2 attempt, 3 outcome: "next" | "complete" | "fail",
--       4 now (ms), 5 phase name, 6 phase output, 7 encoded Phase record,
--       8 encoded PhaseCompleted event, 9 encoded next PhaseTask ("next") or
--       terminal event ("complete", "fail"), 10 encoded Rating (a rating phase's success),
--       11 failure reason ("fail"), 12 retention (s), 13 events channel,
--       14 workflow id, 15 result entry id, 16 orchestrators group
-- Returns "applied", "stale:<why>" or "missing".

redis.call('XACK', KEYS[5], ARGV[16], ARGV[15])
redis.call('XDEL', KEYS[5], ARGV[15])

local state = redis.call('HMGET', KEYS[1], 'status', 'phase', 'attempt')
if not state[1] then
  return 'missing'
end
if state[1] ~= 'pending' and state[1] ~= 'running' then
  return 'stale:' .. state[1]
end
if state[2] ~= ARGV[1] or state[3] ~= ARGV[2] then
  return 'stale:phase ' .. tostring(state[2]) .. ' attempt ' .. tostring(state[3])
end

local outcome = ARGV[3]
if outcome ~= 'fail' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
  redis.call('HSET', KEYS[1], 'phase:' .. ARGV[1], ARGV[7])
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[8])
  if ARGV[10] ~= '' then
    redis.call('HSET', KEYS[1], 'rating', ARGV[10])
  end
end

if outcome == 'next' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'phase', tonumber(ARGV[1]) + 1,
    'attempt', '1', 'updated_ms', ARGV[4])
  redis.call('XADD', KEYS[4], '*', 'm', ARGV[9])
  redis.call('PUBLISH', ARGV[13], ARGV[14])
elseif outcome == 'complete' then
  end_workflow(KEYS[1], KEYS[2], KEYS[3], {'status', 'completed', 'phase', tonumber(ARGV[1]) + 1},
    ARGV[9], ARGV[12], ARGV[4], ARGV[13], ARGV[14])
else
  end_workflow(KEYS[1], KEYS[2], KEYS[3], {'status', 'failed', 'reason', ARGV[11]},
    ARGV[9], ARGV[12], ARGV[4], ARGV[13], ARGV[14])
end
return 'applied'
