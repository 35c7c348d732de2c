-- Opens a watch: the run's status and its last event's id, and, for a run
-- that is still going, the mark that makes its scripts announce new events
-- (`watched`; the worker's fence.lua and ending.lua read it). Runs nobody
-- has watched are not announced: their events are appended without a
-- PUBLISH. The mark comes before the watcher's first read of the events,
-- so every event is either in that read or announced after it.
--
-- KEYS: 1 state hash, 2 events stream
-- Returns {} when the run does not exist, else {status, last event id or ""}.

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {}
end
if status ~= 'completed' and status ~= 'failed' and status ~= 'cancelled' then
  redis.call('HSETNX', KEYS[1], 'watched', '1')
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return {status, last[1] and last[1][1] or ''}
