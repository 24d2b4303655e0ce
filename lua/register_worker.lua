--[[
register_worker: reserve a worker id in the run.

KEYS[1] meta         hash
KEYS[2] workers      zset (worker id -> registration order)
KEYS[3] worker_info  hash (worker id -> JSON record)
KEYS[4] events       stream
KEYS[5] request      string (this request's reply, for replays)

ARGV[1] worker id, or '' for the first free `worker_<n>` (n = number of
        workers so far, counting up past ids already taken)
ARGV[2] worker record (JSON: host, pid, started)
ARGV[3] events stream cap
ARGV[4] request reply lifetime (ms)

Returns the worker id.
Errors: NEPS_RUN_NOT_FOUND, NEPS_WORKER_EXISTS (the id is taken).
Events: worker_registered.
]]

local meta, workers, worker_info, events, request =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local done = replayed(request)
if done then
  return done
end

if redis.call('EXISTS', meta) == 0 then
  return fail(E.NEPS_RUN_NOT_FOUND, 'run has not been created')
end

local worker_id = ARGV[1]
if worker_id == '' then
  local n = redis.call('ZCARD', workers)
  worker_id = 'worker_' .. n
  while redis.call('ZSCORE', workers, worker_id) do
    n = n + 1
    worker_id = 'worker_' .. n
  end
elseif redis.call('ZSCORE', workers, worker_id) then
  local taken = redis.call('ZRANGE', workers, 0, -1)
  return fail(E.NEPS_WORKER_EXISTS, "Worker id '" .. worker_id ..
    "' already exists, reserved worker ids: " .. table.concat(taken, ', '))
end

local seq = redis.call('HINCRBY', meta, 'next_worker_seq', 1)
redis.call('ZADD', workers, seq, worker_id)
redis.call('HSET', worker_info, worker_id, ARGV[2])
emit(events, ARGV[3], 'worker_registered', '', worker_id)
remember(request, worker_id, ARGV[4])
return worker_id
