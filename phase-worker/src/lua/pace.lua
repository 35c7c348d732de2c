-- Shared pacing of one model across all workers: a request rate limit (at
-- most one call per interval, strictly spaced), a tokens-per-minute limit
-- (no 60 s window's calls reserve more than the limit), and the provider's
-- Retry-After, which makes every worker hold off, not just the one that was
-- told. Uses Redis's clock, so workers' clocks need not agree.
--
-- The token limit keeps a log of the last minute's reservations (a sorted
-- set by time, members "<id>:<tokens>"): a call may start when the tokens
-- reserved in the last 61 s plus its own fit the limit, else it learns when
-- enough of the log will have aged out. The extra second is a margin for
-- the time between a reservation here and the request's arrival at the
-- provider, which counts by arrival: without it, two calls reserved just
-- over 60 s apart could arrive just under. A call larger than the limit on
-- its own waits for an empty window.
--
-- KEYS: 1 the model's pace hash, 2 the model's token log
-- ARGV: 1 "reserve" or "back_off",
--       2 reserve: the interval in ms (0 = no request limit); back_off: the wait in ms,
--       3 back_off: the pace channel, 4 back_off: the model,
--       5 reserve: tokens per minute (0 = no token limit), 6 the call's tokens,
--       7 a unique id for the reservation
-- Returns for "reserve": 0 when the call may start now (its slot and tokens
-- are taken), else the ms to wait before asking again. "back_off" returns 0.

local WINDOW_MS = 61000
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
if interval > 0 then
  local next_slot = tonumber(redis.call('HGET', KEYS[1], 'next_slot') or '0')
  if next_slot > now then
    return next_slot - now
  end
end

-- How long until `wanted` more tokens fit the last minute's log, or 0.
local function token_wait(limit, wanted)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - WINDOW_MS)
  local log = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local reserved = 0
  for i = 1, #log, 2 do
    reserved = reserved + tonumber(string.match(log[i], ':(%d+)$'))
  end
  if reserved + wanted <= limit or reserved == 0 then
    return 0
  end
  local freed = 0
  for i = 1, #log, 2 do
    freed = freed + tonumber(string.match(log[i], ':(%d+)$'))
    if reserved - freed + wanted <= limit or freed == reserved then
      return tonumber(log[i + 1]) + WINDOW_MS - now + 1
    end
  end
  return WINDOW_MS
end

local limit = tonumber(ARGV[5] or '0')
local wanted = tonumber(ARGV[6] or '0')
if limit > 0 then
  local wait = token_wait(limit, wanted)
  if wait > 0 then
    return wait
  end
  redis.call('ZADD', KEYS[2], now, ARGV[7] .. ':' .. wanted)
  redis.call('PEXPIRE', KEYS[2], WINDOW_MS + 1000)
end
if interval > 0 then
  redis.call('HSET', KEYS[1], 'next_slot', now + interval)
  redis.call('PEXPIRE', KEYS[1], interval + 60000)
end
return 0
