-- Shared by the worker's scripts, which are this file followed by their own
-- text: the fence every write of a task passes, and the event append.

-- The workflow's status when it is still waiting for this task (pending or
-- running, at this phase and attempt), else nil. Further field names are
-- read in the same HMGET: their values follow in the second result, from
-- index 4 on.
local function current_status(state_key, phase, attempt, ...)
  local state = redis.call('HMGET', state_key, 'status', 'phase', 'attempt', ...)
  if (state[1] == 'pending' or state[1] == 'running') and state[2] == phase and state[3] == attempt then
    return state[1], state
  end
  return nil
end

-- Appends an event for a current task and wakes its watchers; the first
-- append moves a pending workflow to running.
local function append_event(state_key, status, events_key, event, now, channel, workflow_id)
  if status == 'pending' then
    redis.call('HSET', state_key, 'status', 'running', 'updated_ms', now)
  end
  redis.call('XADD', events_key, '*', 'm', event)
  redis.call('PUBLISH', channel, workflow_id)
end

