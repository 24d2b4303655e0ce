--[[
put_trial: replace a stored trial with the caller's copy of it
(NePS's `put_updated_trial`), moving it to the index of its new state.

The write is fenced like a report: the copy must carry the claim token the
stored trial is held under (none when nobody holds it), so a copy read
before a takeover cannot overwrite the new holder's trial. A copy that
makes a trial evaluating is how NePS's runtime claims a pending trial: it
arrives with a fresh token in its fields and counts as an attempt.

KEYS[1] trial:<id>   hash
KEYS[2] pending      zset
KEYS[3] evaluating   zset
KEYS[4] finished     zset
KEYS[5] counts       hash
KEYS[6] events       stream
KEYS[7] request      string (this request's reply, for replays)

ARGV[1] trial id
ARGV[2] worker id ('' when unknown)
ARGV[3] the trial's new state
ARGV[4] pending score (time_sampled), used if the new state is pending
ARGV[5] events stream cap
ARGV[6] request reply lifetime (ms)
ARGV[7] lease length (ms), used if the new state is evaluating
ARGV[8] claim token the caller's copy was read with ('' when none)
then two lists, each a count followed by its values: fields to delete;
field/value pairs to set

Returns 'OK'.
Errors: NEPS_TRIAL_NOT_FOUND <id>; NEPS_LEASE_LOST <id> (the trial is held
under another token); NEPS_BAD_ARGUMENT.
Events: updated; late_update when fenced off. A refused write answers a
replay with the same refusal and no second event.
]]

local key, events, request = KEYS[1], KEYS[6], KEYS[7]
local idx, counts = {KEYS[2], KEYS[3], KEYS[4]}, KEYS[5]
local id, worker_id, state = ARGV[1], ARGV[2], ARGV[3]
local maxlen, request_ttl, lease_ms = ARGV[5], ARGV[6], tonumber(ARGV[7])
local token = ARGV[8]

-- Kept as the reply of a refused write, so that a replay refuses again
-- without a second event.
local REFUSED = '!lease_lost'

local done = replayed(request)
if done == REFUSED then
  return fail(E.NEPS_LEASE_LOST, id)
elseif done then
  return done
end

-- Check everything before the first write.
local clear, pos = take_list(9)
local set
if pos then
  set, pos = take_list(pos)
end
if set == nil or pos ~= #ARGV + 1 or #set == 0 then
  return fail(E.NEPS_BAD_ARGUMENT, 'trial arguments are malformed')
end
if redis.call('EXISTS', key) == 0 then
  return fail(E.NEPS_TRIAL_NOT_FOUND, id)
end
local current = redis.call('HMGET', key, 'state', 'token')
local held = current[1] == 'evaluating' and current[2] or ''
if token ~= held then
  emit(events, maxlen, 'late_update', id, worker_id, 'state', state)
  remember(request, REFUSED, request_ttl)
  return fail(E.NEPS_LEASE_LOST, id)
end

if state == 'evaluating' and current[1] ~= 'evaluating' then
  redis.call('HINCRBY', key, 'attempts', 1)
end
rewrite(key, id, state, ARGV[4], now_ms() + (lease_ms or 0), clear, set, idx,
        counts)
emit(events, maxlen, 'updated', id, worker_id, 'state', state)

remember(request, 'OK', request_ttl)
return 'OK'
