-- Shared by approve_step.lua and reject_step.lua, which are this file
-- followed by their own text: the fence of an approval gate.

-- Nil when the run waits at the gate of phase `index`; else what the script
-- replies instead: "missing", the run's status, or
-- "awaiting_approval:<the phase it waits at>".
local function not_waiting_at(state_key, index)
  local state = redis.call('HMGET', state_key, 'status', 'gate')
  if not state[1] then
    return 'missing'
  end
  if state[1] ~= 'awaiting_approval' then
    return state[1]
  end
  if state[2] ~= index then
    return 'awaiting_approval:' .. tostring(state[2])
  end
  return nil
end
