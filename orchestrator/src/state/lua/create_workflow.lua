-- Accepts a workflow: state, plan, first event, index entry and first phase
-- task, all or nothing. With an idempotency key, a second call returns the
-- workflow the first one created (or a mismatch if the plan differs).
--
-- KEYS: 1 state hash, 2 events stream, 3 outputs hash, 4 shard index zset,
--       5 shard task stream, 6 idempotency key, 7 pipeline snapshot key
-- ARGV: 1 workflow id, 2 "1" when an idempotency key was given,
--       3 plan fingerprint, 4 now (ms), 5 encoded ProjectPlan,
--       6 plan text for prompts, 7 pipeline fingerprint, 8 encoded PipelineSnapshot,
--       9 encoded accepted event, 10 encoded first PhaseTask,
--       11 idempotency key as given, 12 retention (s),
--       13 encoded RunChoices (models per role, instructions), 14 the run's
--       cost cap in USD (0: none), which workers check each call against,
--       15 the first task's start template (see complete_task.lua), stored
--       with its entry; then, for a fork, what it starts with (all optional, each a count
--       followed by its items): state hash field/value pairs (they override
--       the defaults above, 'phase' among them), outputs hash name/text
--       pairs (the copied phases' outputs), and events (the copied phases'
--       completed events, after the accepted event)
-- Returns {1, id} when created, {0, id, "match"|"mismatch"} when the key existed.

if ARGV[2] == '1' then
  local existing = redis.call('GET', KEYS[6])
  if existing then
    local sep = string.find(existing, '|', 1, true)
    local id = string.sub(existing, 1, sep - 1)
    local fingerprint = string.sub(existing, sep + 1)
    if fingerprint == ARGV[3] then
      return {0, id, 'match'}
    end
    return {0, id, 'mismatch'}
  end
  -- No TTL yet: the record expires with the workflow, when it ends.
  redis.call('SET', KEYS[6], ARGV[1] .. '|' .. ARGV[3])
end
local idempotency_record = ''
if ARGV[2] == '1' then
  idempotency_record = KEYS[6]
end

-- The fork's sections: a count, then that many items (pairs count twice).
local at = 16
local function section(per_item)
  local count = tonumber(ARGV[at] or '0')
  local items = {}
  for i = 1, count * per_item do
    items[i] = ARGV[at + i]
  end
  at = at + count * per_item + 1
  return items
end
local extra_state = section(2)
local copied_outputs = section(2)
local copied_events = section(1)

redis.call('SET', KEYS[7], ARGV[8], 'NX')
redis.call('HSET', KEYS[1],
  'status', 'pending', 'phase', '0', 'attempt', '1',
  'pipeline', ARGV[7], 'plan', ARGV[5], 'plan_fp', ARGV[3],
  'created_ms', ARGV[4], 'updated_ms', ARGV[4], 'idem', ARGV[11],
  'idem_key', idempotency_record, 'retention_s', ARGV[12], 'choices', ARGV[13],
  'budget_usd', ARGV[14], 'spent_usd', '0', unpack(extra_state))
redis.call('HSET', KEYS[3], 'plan', ARGV[6], unpack(copied_outputs))
-- A tenant's runs in flight, per shard (ending a run removes it): what the
-- tenant's limit on runs in flight counts.
local tenant = nil
for i = 1, #extra_state - 1, 2 do
  if extra_state[i] == 'tenant' then
    tenant = extra_state[i + 1]
  end
end
if tenant and tenant ~= '' then
  redis.call('SADD', string.gsub(KEYS[4], ':index$', ':tenant:' .. tenant .. ':running'), ARGV[1])
end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[9])
for _, copied in ipairs(copied_events) do
  redis.call('XADD', KEYS[2], '*', 'm', copied)
end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'm', ARGV[10], 's', ARGV[15])
return {1, ARGV[1]}
