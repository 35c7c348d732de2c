-- Shared by the scripts that end a workflow (the orchestrator's cancel, the
-- worker's phase completion and dead-letter), which are this file followed by
-- their own text.

-- Ends a workflow: status, reason, the terminal event, and the retention
-- clock on all its keys, the idempotency record included (it lives exactly
-- as long as the workflow, so a retry with the key finds the run for as long
-- as the run can be found). Wakes the workflow's watchers.
--
-- The retention is the one the workflow was created with (`retention_s`), so
-- a worker that ends a run needs no retention setting of its own; `ttl` only
-- serves runs created before that field existed.
local function end_workflow(state_key, events_key, outputs_key, fields, event, ttl, now, channel, workflow_id)
  local stored = redis.call('HMGET', state_key, 'retention_s', 'tenant', 'idem_key', 'watched')
  ttl = stored[1] or ttl
  local tenant, idempotency_record = stored[2], stored[3]
  redis.call('HSET', state_key, 'updated_ms', now, unpack(fields))
  redis.call('XADD', events_key, '*', 'm', event)
  redis.call('EXPIRE', state_key, ttl)
  redis.call('EXPIRE', events_key, ttl)
  redis.call('EXPIRE', outputs_key, ttl)
  if tenant and tenant ~= '' then
    -- The shard's set of the tenant's runs in flight (create_workflow.lua).
    local shard = string.match(state_key, '^(.-):wf:')
    redis.call('SREM', shard .. ':tenant:' .. tenant .. ':running', workflow_id)
  end
  if idempotency_record and idempotency_record ~= '' then
    redis.call('EXPIRE', idempotency_record, ttl)
  end
  if stored[4] == '1' then
    redis.call('PUBLISH', channel, workflow_id)
  end
end
