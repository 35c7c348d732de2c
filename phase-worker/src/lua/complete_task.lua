-- Settles a task: appends the last streamed output, applies the phase's
-- result (records it, then queues the next phase, completes the run or
-- fails it) and acknowledges the task, all in one step. So a task is never
-- acknowledged without its result applied, a result is applied at most once
-- (the fence), and the next phase is queued in the same fsync'd write that
-- records this one: one round trip from a model's answer to the next task.
--
-- Only the consumer that holds the task may settle it: a worker whose task
-- was taken over (a new attempt) touches nothing, so it can neither apply a
-- stale result nor acknowledge the entry from under its new owner. A result
-- is applied only while its attempt is the workflow's current one.
--
-- KEYS: 1 shard task stream, 2 state hash, 3 events stream, 4 outputs hash,
--       5 shard approval gates zset
-- ARGV: 1 workers group, 2 task entry id, 3 this consumer, 4 phase index,
--       5 attempt, 6 events channel, 7 workflow id, 8 how many final events
--       (the last streamed text) end ARGV, 9 step: "" (no result, only acknowledge) | "next" |
--       "await" | "complete" | "fail", 10 now (ms), 11 phase name, 12 phase output,
--       13 encoded Phase record, 14 encoded PhaseCompleted event,
--       15 encoded next PhaseTask ("next") or terminal event, 16 encoded
--       Rating or "", 17 failure reason ("fail"), 18 retention (s) for runs
--       that do not carry their own, 19 "1" to claim the shard's next new
--       task for this consumer (its slot is free now) or "0", 20 what the
--       phase cost (USD), added to the run's spend; 21 encoded
--       awaiting-approval event, 22 gate deadline (ms), 23 what the timeout
--       does ("approve" | "reject") ("" unless "await"); then the final
--       events, appended before the step's own
-- Returns {outcome} or, having claimed a task, {outcome, entry id, payload}.
-- The outcome is "applied", "settled" (acknowledged, nothing to apply or
-- the workflow moved on) or "not_ours" (taken over: nothing touched).
--
-- Claiming here is what a read loop would do next (the oldest task no
-- consumer has been given, fair to every workflow), minus its round trip:
-- when the task just queued is the next one, the worker starts it at once.

local function claim_next(outcome)
  if ARGV[19] ~= '1' then
    return {outcome}
  end
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[3], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if not read or not read[1] or not read[1][2][1] then
    return {outcome}
  end
  local entry = read[1][2][1]
  local payload = ''
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'm' then
      payload = entry[2][i + 1]
    end
  end
  return {outcome, entry[1], payload}
end

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if not pending[1] or pending[1][2] ~= ARGV[3] then
  return claim_next('not_ours')
end

local outcome = 'settled'
local status = current_status(KEYS[2], ARGV[4], ARGV[5])
if status then
  local step = ARGV[9]
  local finals = tonumber(ARGV[8])
  for i = #ARGV - finals + 1, #ARGV do
    redis.call('XADD', KEYS[3], '*', 'm', ARGV[i])
  end
  if finals > 0 and step == '' then
    -- No step follows to move the run on and wake its watchers.
    if status == 'pending' then
      redis.call('HSET', KEYS[2], 'status', 'running', 'updated_ms', ARGV[10])
    end
    redis.call('PUBLISH', ARGV[6], ARGV[7])
  end
  -- The state hash's new fields, written in one HSET with the step's own.
  local recorded = {}
  if step ~= '' and step ~= 'fail' then
    redis.call('HSET', KEYS[4], ARGV[11], ARGV[12])
    recorded = {'phase:' .. ARGV[4], ARGV[13]}
    redis.call('XADD', KEYS[3], '*', 'm', ARGV[14])
    if ARGV[16] ~= '' then
      recorded[3] = 'rating'
      recorded[4] = ARGV[16]
    end
    if tonumber(ARGV[20]) > 0 then
      redis.call('HINCRBYFLOAT', KEYS[2], 'spent_usd', ARGV[20])
    end
  end
  if step == 'next' then
    redis.call('HSET', KEYS[2], 'status', 'running', 'phase', tonumber(ARGV[4]) + 1,
      'attempt', '1', 'starts', '0', 'updated_ms', ARGV[10], unpack(recorded))
    redis.call('XADD', KEYS[1], '*', 'm', ARGV[15])
    redis.call('PUBLISH', ARGV[6], ARGV[7])
  elseif step == 'await' then
    -- The next task waits in the state hash, not the stream: no worker holds
    -- the run while a person decides (ApproveStep queues it).
    redis.call('HSET', KEYS[2], 'status', 'awaiting_approval', 'phase', tonumber(ARGV[4]) + 1,
      'attempt', '1', 'starts', '0', 'updated_ms', ARGV[10], 'gate', ARGV[4], 'gate_task', ARGV[15],
      'gate_deadline_ms', ARGV[22], 'gate_on_timeout', ARGV[23], unpack(recorded))
    redis.call('XADD', KEYS[3], '*', 'm', ARGV[21])
    redis.call('ZADD', KEYS[5], ARGV[22], ARGV[7])
    redis.call('PUBLISH', ARGV[6], ARGV[7])
  elseif step == 'complete' then
    local fields = {'status', 'completed', 'phase', tonumber(ARGV[4]) + 1}
    for i = 1, #recorded do
      fields[#fields + 1] = recorded[i]
    end
    end_workflow(KEYS[2], KEYS[3], KEYS[4], fields,
      ARGV[15], ARGV[18], ARGV[10], ARGV[6], ARGV[7])
  elseif step == 'fail' then
    end_workflow(KEYS[2], KEYS[3], KEYS[4], {'status', 'failed', 'reason', ARGV[17]},
      ARGV[15], ARGV[18], ARGV[10], ARGV[6], ARGV[7])
  end
  if step ~= '' then
    outcome = 'applied'
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return claim_next(outcome)
