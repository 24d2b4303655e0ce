--[[
delete_run: delete a run so that it can start afresh, unless a worker is
alive in it.

NePS's "start afresh" deletes the run directory, even under a worker that
is evaluating a trial in it. Here the check and the deletion are one step:
if any trial is evaluating under a lease that has not expired, or a worker
holds the optimizer lease (it is sampling), nothing is deleted and the
live trials are returned so the caller can name their workers. The event
stream is kept, with a `deleted` entry, as the record of what was there.

The caller passes every trial key it read from the `trials` index; if the
index changed meanwhile, the script answers 'stale' and the caller reads
again.

KEYS[1] meta              hash
KEYS[2] trials            zset
KEYS[3] evaluating        zset (id -> lease deadline, ms)
KEYS[4] optimizer_lease   string
KEYS[5] worker_info       hash
KEYS[6] events            stream (kept)
KEYS[7 .. 6+f] the run's other keys without an id, deleted
KEYS[7+f ..] trial:<id>   hash of each trial, in the order of ARGV[4..]

ARGV[1] f, the number of other keys
ARGV[2] events stream cap
ARGV[3] who asks (a worker id or '')
ARGV[4..] the trial ids, in the order of their keys

Returns {'deleted', number of trials}; {'missing'} when there is no run;
{'stale'} when the trial ids given are not the run's; {'live',
sampling ('1' or '0'), id, worker id, lease deadline (ms), worker record
(JSON or ''), ...} when a worker is alive in the run.
Errors: NEPS_BAD_ARGUMENT.
Events: deleted.
]]

local meta, trials, evaluating, lease, worker_info, events =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local f = tonumber(ARGV[1])
local maxlen, who = ARGV[2], ARGV[3]
if f == nil or #KEYS - 6 - f ~= #ARGV - 3 then
  return fail(E.NEPS_BAD_ARGUMENT, 'trial keys do not match the trial ids')
end

local function key_of(id)
  for i = 4, #ARGV do
    if ARGV[i] == id then
      return KEYS[6 + f + i - 3]
    end
  end
  return nil
end

-- Check everything before the first write.
if redis.call('EXISTS', meta) == 0 and redis.call('ZCARD', trials) == 0 then
  return {'missing'}
end
if redis.call('ZCARD', trials) ~= #ARGV - 3 then
  return {'stale'}
end
for i = 4, #ARGV do
  if not redis.call('ZSCORE', trials, ARGV[i]) then
    return {'stale'}
  end
end

local now = now_ms()
local live = redis.call('ZRANGEBYSCORE', evaluating, '(' .. now, '+inf',
  'WITHSCORES')
local sampling = redis.call('EXISTS', lease)
if #live > 0 or sampling == 1 then
  local reply = {'live', tostring(sampling)}
  for i = 1, #live, 2 do
    local id, deadline = live[i], live[i + 1]
    local worker = ''
    local key = key_of(id)
    if key then
      worker = redis.call('HGET', key, 'evaluating_worker_id') or ''
    end
    local record = ''
    if worker ~= '' then
      record = redis.call('HGET', worker_info, worker) or ''
    end
    for _, v in ipairs({id, worker, deadline, record}) do
      table.insert(reply, v)
    end
  end
  return reply
end

-- Delete everything but the event stream.
local n = #ARGV - 3
local doomed = {meta, trials, evaluating, worker_info}
for i = 7, #KEYS do
  table.insert(doomed, KEYS[i])
end
for i = 1, #doomed, 500 do
  redis.call('DEL', unpack(doomed, i, math.min(i + 499, #doomed)))
end
emit(events, maxlen, 'deleted', '', who, 'trials', tostring(n))
return {'deleted', n}
