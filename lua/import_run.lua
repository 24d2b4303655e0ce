--[[
import_run: store a run read from a NePS run directory, all or nothing.

Moving a study from NePS's files to Redis must not leave half a run behind
when something is wrong, so every trial, every shared error, the worker ids,
the optimizer info and the optimizer state go in one script. In 'new' mode
the run must not exist yet and is created here, as create_run would; in
'existing' mode it must exist (with this layout version), keeps its
optimizer info and optimizer state, and gains the trials, the errors after
its own, and the worker ids it lacks. Everything is checked before the
first write.

KEYS[1] meta              hash
KEYS[2] optimizer_state   hash
KEYS[3] pipeline_space    string
KEYS[4] trials            zset (id -> creation order)
KEYS[5] pending           zset
KEYS[6] evaluating        zset
KEYS[7] finished          zset
KEYS[8] counts            hash
KEYS[9] errors            stream (the shared errors)
KEYS[10] events           stream
KEYS[11] workers          zset (worker id -> registration order)
KEYS[12] worker_info      hash (worker id -> JSON record)
KEYS[13] request          string (this request's reply, for replays)
KEYS[14..] trial:<id>     hash, one per trial, in the order of ARGV

ARGV[1] mode: 'new' or 'existing'
ARGV[2] schema version of the caller's layout
ARGV[3] optimizer info (JSON; used in 'new' mode)
ARGV[4] pipeline space fingerprint ('' when unknown; 'new' mode)
ARGV[5] time of creation (seconds, text; 'new' mode)
ARGV[6] events stream cap (approximate MAXLEN)
ARGV[7] request reply lifetime (ms)
ARGV[8] lease length (ms) for trials imported evaluating
ARGV[9] pickled pipeline space ('' for none; 'new' mode)
then four lists, each a count followed by its values:
  optimizer_state field/value pairs ('new' mode);
  worker id/record pairs;
  shared errors: per error, a count and its field/value pairs;
  trials: per trial, its id, state, pending score (time_sampled), a count
  and its field/value pairs

Returns 'OK'.
Errors: NEPS_RUN_EXISTS ('new' mode, the run or a key of it exists);
NEPS_RUN_NOT_FOUND ('existing' mode); NEPS_SCHEMA (the existing run has
another layout version); NEPS_TRIAL_EXISTS <id>; NEPS_BAD_ARGUMENT.
Events: created ('new' mode), worker_registered per new worker id,
imported per trial.
]]

local meta, optimizer_state, pipeline_space = KEYS[1], KEYS[2], KEYS[3]
local trials, counts, errors, events = KEYS[4], KEYS[8], KEYS[9], KEYS[10]
local workers, worker_info, request = KEYS[11], KEYS[12], KEYS[13]
local idx = {KEYS[5], KEYS[6], KEYS[7]}
local mode, schema, maxlen = ARGV[1], ARGV[2], ARGV[6]
local request_ttl, lease_ms = ARGV[7], tonumber(ARGV[8])

local done = replayed(request)
if done then
  return done
end

-- Read the arguments before the first write.
local malformed = 'import arguments are malformed'
local state_pairs, pos = take_list(10)
local worker_pairs
if pos then
  worker_pairs, pos = take_list(pos)
end
if worker_pairs == nil or #state_pairs % 2 == 1 or #worker_pairs % 2 == 1 then
  return fail(E.NEPS_BAD_ARGUMENT, malformed)
end

local n_errors = tonumber(ARGV[pos])
if n_errors == nil then
  return fail(E.NEPS_BAD_ARGUMENT, malformed)
end
pos = pos + 1
local error_entries = {}
for _ = 1, n_errors do
  local entry
  entry, pos = take_list(pos)
  if entry == nil or #entry == 0 or #entry % 2 == 1 then
    return fail(E.NEPS_BAD_ARGUMENT, malformed)
  end
  table.insert(error_entries, entry)
end

local n_trials = tonumber(ARGV[pos])
if n_trials == nil or #KEYS ~= 13 + n_trials then
  return fail(E.NEPS_BAD_ARGUMENT, 'trial arguments do not match the keys')
end
pos = pos + 1
local new, seen = {}, {}
for i = 1, n_trials do
  local id, state, score = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2]
  local fields
  if score ~= nil then
    fields, pos = take_list(pos + 3)
  end
  if fields == nil or #fields == 0 or #fields % 2 == 1 then
    return fail(E.NEPS_BAD_ARGUMENT, malformed)
  end
  table.insert(new, {id = id, state = state, score = score, key = KEYS[13 + i],
                     fields = fields})
end
if pos ~= #ARGV + 1 then
  return fail(E.NEPS_BAD_ARGUMENT, malformed)
end

-- Check the run and every trial key before the first write.
if mode == 'new' then
  for _, key in ipairs({meta, optimizer_state, pipeline_space, trials, errors,
                        workers}) do
    if redis.call('EXISTS', key) == 1 then
      return fail(E.NEPS_RUN_EXISTS, 'the run (or a key of it) exists already')
    end
  end
elseif mode == 'existing' then
  if redis.call('EXISTS', meta) == 0 then
    return fail(E.NEPS_RUN_NOT_FOUND, 'run has not been created')
  end
  if redis.call('HGET', meta, 'schema_version') ~= schema then
    return fail(E.NEPS_SCHEMA, 'the run has another layout version')
  end
else
  return fail(E.NEPS_BAD_ARGUMENT, 'mode must be new or existing')
end
for _, t in ipairs(new) do
  if seen[t.id] or redis.call('EXISTS', t.key) == 1 then
    return fail(E.NEPS_TRIAL_EXISTS, t.id)
  end
  seen[t.id] = true
end

-- Create the run.
if mode == 'new' then
  redis.call('HSET', meta,
    'schema_version', schema,
    'optimizer_info', ARGV[3],
    'space_fingerprint', ARGV[4],
    'created_at', ARGV[5],
    'next_seq', 0,
    'next_worker_seq', 0)
  if #state_pairs > 0 then
    redis.call('HSET', optimizer_state, unpack(state_pairs))
  end
  if ARGV[9] ~= '' then
    redis.call('SET', pipeline_space, ARGV[9])
  end
  emit(events, maxlen, 'created', '', '')
end

-- Register the worker ids the run does not know yet, in their order.
for i = 1, #worker_pairs, 2 do
  local worker_id = worker_pairs[i]
  if not redis.call('ZSCORE', workers, worker_id) then
    local seq = redis.call('HINCRBY', meta, 'next_worker_seq', 1)
    redis.call('ZADD', workers, seq, worker_id)
    redis.call('HSET', worker_info, worker_id, worker_pairs[i + 1])
    emit(events, maxlen, 'worker_registered', '', worker_id)
  end
end

-- Append the shared errors after any the run has, in the directory's order.
for _, entry in ipairs(error_entries) do
  redis.call('XADD', errors, '*', unpack(entry))
end

-- Store the trials in creation order, each in the index of its state.
local deadline = now_ms() + (lease_ms or 0)
for _, t in ipairs(new) do
  local seq = redis.call('HINCRBY', meta, 'next_seq', 1)
  redis.call('HSET', t.key, 'seq', seq, unpack(t.fields))
  redis.call('ZADD', trials, seq, t.id)
  local score = t.score
  if t.state == 'evaluating' then
    score = deadline
    redis.call('HSET', t.key, 'lease_deadline_ms', deadline)
  elseif t.state ~= 'pending' then
    score = seq
  end
  move(t.id, false, t.state, score, idx, counts)
  emit(events, maxlen, 'imported', t.id, '', 'state', t.state)
end

remember(request, 'OK', request_ttl)
return 'OK'
