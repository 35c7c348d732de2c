-- Shared by the worker's scripts, which are this file followed by their own
-- text: the fence every write of a task passes, and the event append.

-- The workflow's status when it is still waiting for this task (pending or
-- running, at this phase and attempt), else nil. The second result holds
-- the fields read: status, phase, attempt, `watched` (set once anybody
-- watches the run: see notify_watchers), then the values of any further
-- field names given, from index 5 on.
local function current_status(state_key, phase, attempt, ...)
  local state = redis.call('HMGET', state_key, 'status', 'phase', 'attempt', 'watched', ...)
  if (state[1] == 'pending' or state[1] == 'running') and state[2] == phase and state[3] == attempt then
    return state[1], state
  end
  return nil
end

-- Wakes the run's watchers, if it has ever had any. An orchestrator marks
-- a run `watched` before a watcher's first read (watch.rs), so an event
-- appended after that read is announced, and one appended before it is in
-- it; a run nobody watches is spared the PUBLISH on every event (on a
-- cluster, a message to every node).
local function notify_watchers(state, channel, workflow_id)
  if state[4] == '1' then
    redis.call('PUBLISH', channel, workflow_id)
  end
end

-- Appends an event for a current task (state: current_status's second
-- result) and wakes its watchers; the first append moves a pending
-- workflow to running.
local function append_event(state_key, state, events_key, event, now, channel, workflow_id)
  if state[1] == 'pending' then
    redis.call('HSET', state_key, 'status', 'running', 'updated_ms', now)
  end
  redis.call('XADD', events_key, '*', 'm', event)
  notify_watchers(state, channel, workflow_id)
end


-- Appends to reply the stored outputs a phase's prompt reads (inputs:
-- their names), "" for one not stored; returns reply.
local function append_inputs(reply, outputs_key, inputs)
  if #inputs > 0 then
    local values = redis.call('HMGET', outputs_key, unpack(inputs))
    for i = 1, #inputs do
      reply[#reply + 1] = values[i] or ''
    end
  end
  return reply
end

-- Starts a task if it is still current: appends its phase-started event,
-- counts the start (for poison detection; reset when the run moves to its
-- next phase) and returns {cost cap (USD, "0" for none), spent so far
-- (USD), tenant ("" for none), input values...}; nil when it is stale.
-- start_task.lua and the claim in complete_task.lua start this way (the
-- task its own step has just queued starts from what that step knows).
local function start_current(state_key, events_key, outputs_key, phase, attempt, event, now, channel,
    workflow_id, inputs)
  local status, state = current_status(state_key, phase, attempt, 'budget_usd', 'spent_usd', 'tenant')
  if not status then
    return nil
  end
  append_event(state_key, state, events_key, event, now, channel, workflow_id)
  redis.call('HINCRBY', state_key, 'starts', 1)
  return append_inputs({state[5] or '0', state[6] or '0', state[7] or ''}, outputs_key, inputs)
end
