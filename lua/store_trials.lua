--[[
store_trials: store newly sampled (or imported) trials and the optimizer
state together, if the caller still holds the optimizer lease.

The optimizer runs in Python while its caller holds the run's optimizer
lease. This script is the end of that critical section: it checks the lease,
then writes every new trial, the new optimizer state (RNG snapshot, budget)
and one event per trial, all or nothing. Called with no trials it stores the
optimizer state alone.

KEYS[1] meta              hash
KEYS[2] optimizer_lease   string (token of the lease holder)
KEYS[3] optimizer_state   hash
KEYS[4] trials            zset (id -> creation order)
KEYS[5] pending           zset
KEYS[6] evaluating        zset
KEYS[7] finished          zset
KEYS[8] counts            hash
KEYS[9] events            stream
KEYS[10] request          string (this request's reply, for replays)
KEYS[11] optimizer_free   list (wakes a sampler waiting for the lease)
KEYS[12..] trial:<id>     hash, one per new trial, in the order of ARGV

ARGV[1] optimizer lease token ('' to store without the lease: imports)
ARGV[2] '1' to release the lease after storing
ARGV[3] event name ('sampled' or 'imported')
ARGV[4] worker id
ARGV[5] events stream cap
ARGV[6] request reply lifetime (ms)
ARGV[7] lease length (ms) for trials stored already evaluating
ARGV[8] number k of optimizer_state field/value pairs; a '' value deletes
ARGV[9 .. 8+2k] the pairs
then, per trial: id, state, pending score (time_sampled), number m of
field/value pairs, the 2m pairs

Returns 'OK'.
Errors: NEPS_RUN_NOT_FOUND; NEPS_LEASE_LOST (the lease expired or was
taken); NEPS_TRIAL_EXISTS <id>; NEPS_BAD_ARGUMENT.
Events: one <ARGV[3]> per trial.
]]

local meta, lease, optimizer_state, trials = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local idx = {KEYS[5], KEYS[6], KEYS[7]}
local counts, events, request, free = KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local token, release, event, worker_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxlen, request_ttl, lease_ms = ARGV[5], ARGV[6], tonumber(ARGV[7])

local done = replayed(request)
if done then
  return done
end

-- Check everything before the first write.
if redis.call('EXISTS', meta) == 0 then
  return fail(E.NEPS_RUN_NOT_FOUND, 'run has not been created')
end
if token ~= '' and redis.call('GET', lease) ~= token then
  return fail(E.NEPS_LEASE_LOST, 'the optimizer lease expired or was taken')
end

local k = tonumber(ARGV[8])
local state_set, state_del = {}, {}
local pos = 9
for _ = 1, k do
  local field, value = ARGV[pos], ARGV[pos + 1]
  if value == '' then
    table.insert(state_del, field)
  else
    table.insert(state_set, field)
    table.insert(state_set, value)
  end
  pos = pos + 2
end

local new, seen = {}, {}
local key_i = 12
while pos <= #ARGV do
  local id, state, score, m = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2],
    tonumber(ARGV[pos + 3])
  local key = KEYS[key_i]
  if key == nil or m == nil or m < 1 or pos + 3 + 2 * m > #ARGV then
    return fail(E.NEPS_BAD_ARGUMENT, 'trial arguments do not match the keys')
  end
  if seen[id] or redis.call('EXISTS', key) == 1 then
    return fail(E.NEPS_TRIAL_EXISTS, id)
  end
  seen[id] = true
  local fields = {}
  for j = pos + 4, pos + 3 + 2 * m do
    table.insert(fields, ARGV[j])
  end
  table.insert(new, {id = id, state = state, score = score, key = key,
                     fields = fields})
  pos = pos + 4 + 2 * m
  key_i = key_i + 1
end
if key_i ~= #KEYS + 1 then
  return fail(E.NEPS_BAD_ARGUMENT, 'more trial keys than trials')
end

-- Write.
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
  emit(events, maxlen, event, t.id, worker_id, 'state', t.state)
end

if #state_set > 0 then
  redis.call('HSET', optimizer_state, unpack(state_set))
end
if #state_del > 0 then
  redis.call('HDEL', optimizer_state, unpack(state_del))
end
if release == '1' and token ~= '' then
  hand_off(lease, free)
end

remember(request, 'OK', request_ttl)
return 'OK'
