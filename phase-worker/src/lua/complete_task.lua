-- Settles a task: appends the last streamed text, applies the phase's
-- result (records it, then queues the next phase, completes the run or
-- fails it) and acknowledges the task, all in one step. So a task is never
-- acknowledged without its result applied, a result is applied at most once
-- (the fence), and the next phase is queued in the same fsync'd write that
-- records this one: one round trip from a model's answer to the next task,
-- which this step also claims and, usually, starts (below).
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
--       does ("approve" | "reject") ("" unless "await"), 24 the next
--       task's start template ("next"; see below), 25 the rest of a
--       phase-started event for a task claimed here (its time and this
--       worker); then the final events, appended before the step's own
-- Returns {outcome}, or having claimed a task {outcome, entry id, payload},
-- or having also started it {outcome, entry id, payload, "started", cost
-- cap, spent, tenant, input values...}.
-- The outcome is "applied", "settled" (acknowledged, nothing to apply or
-- the workflow moved on) or "not_ours" (taken over: nothing touched).
--
-- Claiming here is what a read loop would do next (the oldest task no
-- consumer has been given, fair to every workflow), minus its round trip:
-- when the task just queued is the next one, the worker starts it at once.
-- A claimed task whose entry carries a start template (field `s`:
-- workflow id, phase, attempt and input names, a line each, then its
-- phase-started event without time and worker) is also started here:
-- fenced, its event appended, its inputs and its run's budget read. That
-- saves the worker another round trip per phase. Another run's task starts
-- with fence.lua's start_current; the task this step has just queued
-- starts in advance (below), from what the step already knows.
-- The claimed task's keys are derived from its id the way the key layout
-- (pipeline/src/keys.rs) spells them; they share the stream's hash tag, so
-- on a cluster they are in this script's slot.

-- The start template's parts: id, phase, attempt, input names, event.
local function parse_template(template)
  local parts = {}
  local at = 1
  for i = 1, 4 do
    local line_end = string.find(template, '\n', at, true)
    if not line_end then
      return nil
    end
    parts[i] = string.sub(template, at, line_end - 1)
    at = line_end + 1
  end
  parts[5] = string.sub(template, at)
  return parts
end

-- A parsed template's input names, as a list.
local function input_names(parts)
  local inputs = {}
  for name in string.gmatch(parts[4], '[^,]+') do
    inputs[#inputs + 1] = name
  end
  return inputs
end

-- Starts a claimed task from its template (start_current); nil when it is
-- stale (the worker then finds that out the usual way) or the template is
-- unusable.
local function start_claimed(template)
  local parts = parse_template(template)
  if not parts then
    return nil
  end
  local workflow_id = parts[1]
  local state_key = string.match(KEYS[1], '^(.-):tasks$') .. ':wf:' .. workflow_id
  local started = start_current(state_key, state_key .. ':events', state_key .. ':outputs', parts[2], parts[3],
    parts[5] .. ARGV[25], ARGV[10], 'nexus:events:' .. workflow_id, workflow_id, input_names(parts))
  if started then
    table.insert(started, 1, 'started')
  end
  return started
end

-- The shard's oldest task no consumer has been given, claimed for this
-- consumer, if it asked (ARGV[19]) and there is one. A failed read (the
-- group deleted under the worker: NOGROUP) claims nothing rather than
-- aborting the script: advance writes the run's state after this read, and
-- an abort there would leave the task acknowledged and the run not moved
-- on. The worker's read loop recreates the group.
local function read_new_entry()
  if ARGV[19] ~= '1' then
    return nil
  end
  local read = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[3], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if not read or read.err or not read[1] or not read[1][2][1] then
    return nil
  end
  return read[1][2][1]
end

-- The reply for a claimed entry, its task started if its template allows.
local function claimed_reply(outcome, entry)
  local payload, template = '', nil
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'm' then
      payload = entry[2][i + 1]
    elseif entry[2][i] == 's' then
      template = entry[2][i + 1]
    end
  end
  local reply = {outcome, entry[1], payload}
  local started = template and start_claimed(template)
  if started then
    for i = 1, #started do
      reply[#reply + 1] = started[i]
    end
  end
  return reply
end

local function claim_next(outcome)
  local entry = read_new_entry()
  if not entry then
    return {outcome}
  end
  return claimed_reply(outcome, entry)
end

local function acknowledge()
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
end

-- The "next" step: moves the run on to its next phase (fields: the state
-- hash's new values, but for the start count, set here) and queues that
-- phase's task. When the worker asked for a claim, the claim takes that
-- very task (no older one waits) and its template names this run's next
-- phase at attempt 1, the task is started from what this script has
-- already read and written, as start_current would: the run is running at
-- the new phase, attempt 1, so the fence holds without reading the state
-- again, and the start is counted in the same HSET. That is two Redis
-- calls fewer per phase (and one PUBLISH, for a watched run) when no older
-- task waits. The state is written before any other claimed task starts:
-- one of the same run (a stale one) meets the fence as the run is now.
local function advance(state, fields, spent)
  local template = ARGV[24]
  local queued
  if template ~= '' then
    queued = redis.call('XADD', KEYS[1], '*', 'm', ARGV[15], 's', template)
  else
    queued = redis.call('XADD', KEYS[1], '*', 'm', ARGV[15])
  end
  acknowledge()
  local entry = read_new_entry()
  local parts = entry and entry[1] == queued and parse_template(template)
  local own = parts and parts[1] == ARGV[7] and parts[2] == tostring(tonumber(ARGV[4]) + 1) and parts[3] == '1'
  fields[#fields + 1] = 'starts'
  fields[#fields + 1] = own and '1' or '0'
  redis.call('HSET', KEYS[2], unpack(fields))
  notify_watchers(state, ARGV[6], ARGV[7])
  if own then
    redis.call('XADD', KEYS[3], '*', 'm', parts[5] .. ARGV[25])
    return append_inputs({'applied', queued, ARGV[15], 'started', state[6] or '0', spent, state[7] or ''},
      KEYS[4], input_names(parts))
  end
  if not entry then
    return {'applied'}
  end
  return claimed_reply('applied', entry)
end

-- Whether this consumer still holds the task's entry.
local function holds_entry()
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  return pending[1] ~= nil and pending[1][2] == ARGV[3]
end

local status, state = current_status(KEYS[2], ARGV[4], ARGV[5], 'spent_usd', 'budget_usd', 'tenant')
if not status then
  -- Stale: cancelled, finished, moved on, or taken over as a new attempt.
  -- Only the holder may acknowledge the entry; a worker it was taken from
  -- touches nothing.
  if not holds_entry() then
    return claim_next('not_ours')
  end
  acknowledge()
  return claim_next('settled')
end
-- Current, so the entry is still this consumer's: a takeover (take_over.lua)
-- moves the entry and bumps the attempt in one step, and a workflow's
-- (phase, attempt) never comes back (phases only advance; the attempt
-- starts at 1 in each). No XPENDING is needed on this path, the usual one.
local step = ARGV[9]
local finals = tonumber(ARGV[8])
for i = #ARGV - finals + 1, #ARGV do
  if step == '' and i == #ARGV then
    -- No step follows to move the run on and wake its watchers.
    append_event(KEYS[2], state, KEYS[3], ARGV[i], ARGV[10], ARGV[6], ARGV[7])
  else
    redis.call('XADD', KEYS[3], '*', 'm', ARGV[i])
  end
end
-- The state hash's new fields, written in one HSET with the step's own.
local recorded = {}
local spent = state[5] or '0'
if step ~= '' and step ~= 'fail' then
  redis.call('HSET', KEYS[4], ARGV[11], ARGV[12])
  recorded = {'phase:' .. ARGV[4], ARGV[13]}
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[14])
  if ARGV[16] ~= '' then
    recorded[#recorded + 1] = 'rating'
    recorded[#recorded + 1] = ARGV[16]
  end
  local cost = tonumber(ARGV[20])
  if cost > 0 then
    -- The run's spend, summed here rather than by HINCRBYFLOAT: one
    -- command fewer, and 14 significant digits are plenty for dollars.
    spent = tostring((tonumber(state[5]) or 0) + cost)
    recorded[#recorded + 1] = 'spent_usd'
    recorded[#recorded + 1] = spent
  end
end
if step == 'next' then
  return advance(state, {'status', 'running', 'phase', tonumber(ARGV[4]) + 1, 'attempt', '1', 'updated_ms', ARGV[10],
    unpack(recorded)}, spent)
elseif step == 'await' then
  -- The next task waits in the state hash, not the stream: no worker holds
  -- the run while a person decides (ApproveStep queues it).
  redis.call('HSET', KEYS[2], 'status', 'awaiting_approval', 'phase', tonumber(ARGV[4]) + 1,
    'attempt', '1', 'starts', '0', 'updated_ms', ARGV[10], 'gate', ARGV[4], 'gate_task', ARGV[15],
    'gate_deadline_ms', ARGV[22], 'gate_on_timeout', ARGV[23], unpack(recorded))
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[21])
  redis.call('ZADD', KEYS[5], ARGV[22], ARGV[7])
  notify_watchers(state, ARGV[6], ARGV[7])
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
acknowledge()
if step ~= '' then
  return claim_next('applied')
end
return claim_next('settled')
