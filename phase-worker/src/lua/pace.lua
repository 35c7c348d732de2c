-- Shared pacing of one model across all workers: a rate limit (at most one
-- call per interval, strictly spaced) and the provider's Retry-After, which
-- makes every worker hold off, not just the one that was told.
-- Uses Redis's clock, so workers' clocks need not agree.
--
-- KEYS: 1 the model's pace hash
-- ARGV: 1 "reserve" or "back_off",
--       2 reserve: the interval in ms (0 = no rate limit); back_off: the wait in ms,
--       3 back_off: the pace channel, 4 back_off: the model
-- Returns for "reserve": 0 when the call may start now (the slot is taken),
-- else the ms to wait before asking again. "back_off" returns 0.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cooldown_until = tonumber(redis.call('HGET', KEYS[1], 'cooldown_until') or '0')

if ARGV[1] == 'back_off' then
  local wait = tonumber(ARGV[2])
  if now + wait > cooldown_until then
    redis.call('HSET', KEYS[1], 'cooldown_until', now + wait)
    redis.call('PEXPIRE', KEYS[1], wait + 60000)
  end
  redis.call('PUBLISH', ARGV[3], ARGV[4] .. '\n' .. ARGV[2])
  return 0
end

if cooldown_until > now then
  return cooldown_until - now
end
local interval = tonumber(ARGV[2])
if interval <= 0 then
  return 0
end
local next_slot = tonumber(redis.call('HGET', KEYS[1], 'next_slot') or '0')
if next_slot > now then
  return next_slot - now
end
redis.call('HSET', KEYS[1], 'next_slot', now + interval)
redis.call('PEXPIRE', KEYS[1], interval + 60000)
return 0
