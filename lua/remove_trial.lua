--[[
remove_trial: delete a trial from the run (NePS's
`lock_and_remove_trial_by_id`), with its own entries in the shared errors;
other trials' errors stay (NePS drops them all).

KEYS[1] trial:<id>   hash
KEYS[2] trials       zset
KEYS[3] pending      zset
KEYS[4] evaluating   zset
KEYS[5] finished     zset
KEYS[6] counts       hash
KEYS[7] errors       stream
KEYS[8] events       stream
KEYS[9] request      string (this request's reply, for replays)

ARGV[1] trial id
ARGV[2] events stream cap
ARGV[3] request reply lifetime (ms)

Returns 'OK'.
Errors: NEPS_TRIAL_NOT_FOUND <id>.
Events: removed.
]]

local key, trials, counts, errors, events, request =
  KEYS[1], KEYS[2], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local idx = {KEYS[3], KEYS[4], KEYS[5]}
local id, maxlen, request_ttl = ARGV[1], ARGV[2], ARGV[3]

local done = replayed(request)
if done then
  return done
end

if redis.call('EXISTS', key) == 0 then
  return fail(E.NEPS_TRIAL_NOT_FOUND, id)
end

local state = redis.call('HGET', key, 'state')
redis.call('ZREM', index_of(state, idx[1], idx[2], idx[3]), id)
redis.call('HINCRBY', counts, state, -1)
redis.call('ZREM', trials, id)
redis.call('DEL', key)
drop_errors(errors, id)
emit(events, maxlen, 'removed', id, '')

remember(request, 'OK', request_ttl)
return 'OK'
