--[[
report: store a trial's evaluation result and finish it.

The caller's copy of the trial (its metadata, set complete by NePS's
`Trial.set_complete`, and its report) replaces the stored one. A report is
fenced by the claim token the copy carries: if the stored trial is held
under another token (its lease expired and it was requeued, reset or taken
over), or under a token while the copy carries none, the late result is
recorded as an event, with its objective, and the trial is left untouched.
A copy without a token may only report a trial that nobody holds and that
has no result yet: a trial never gets a second result (a reset drops the
first), so that one is refused too, and kept as an event. A report with an
error is appended to the shared errors.

KEYS[1] trial:<id>   hash
KEYS[2] pending      zset
KEYS[3] evaluating   zset
KEYS[4] finished     zset
KEYS[5] counts       hash
KEYS[6] errors       stream (the shared errors)
KEYS[7] events       stream
KEYS[8] request      string (this request's reply, for replays)

ARGV[1] trial id
ARGV[2] claim token of the caller's copy ('' when it carries none)
ARGV[3] reporting worker id
ARGV[4] the trial's new state
ARGV[5] pending score (time_sampled), used if the new state is pending
ARGV[6] events stream cap
ARGV[7] request reply lifetime (ms)
ARGV[8] lease length (ms), used if the new state is evaluating
then three lists, each a count followed by its values:
  fields to delete; field/value pairs to set; shared-error field/value
  pairs (empty when the report has no error)

Returns 'OK'.
Errors: NEPS_TRIAL_NOT_FOUND <id>; NEPS_LEASE_LOST <id> (a late report);
NEPS_BAD_STATE (the trial already has a result); NEPS_BAD_ARGUMENT.
Events: reported; late_report when fenced off (with the state and
objective_to_minimize the late report carried). A refused report answers a
replay with the same refusal and no second event.
]]

local key, errors, events, request = KEYS[1], KEYS[6], KEYS[7], KEYS[8]
local idx, counts = {KEYS[2], KEYS[3], KEYS[4]}, KEYS[5]
local id, token, worker_id, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxlen, request_ttl, lease_ms = ARGV[6], ARGV[7], tonumber(ARGV[8])

-- Kept as the reply of a refused report, so that a replay refuses again
-- without recording the late result twice.
local REFUSED, FINISHED = '!lease_lost', '!finished'
local HAS_RESULT = {success = true, failed = true, crashed = true}

local function already_reported(stored_state)
  return fail(E.NEPS_BAD_STATE, "Trial '" .. id .. "' already has a result ("
    .. stored_state .. '): a second report is refused and kept as a'
    .. ' late_report event. Reset the trial to evaluate it again.')
end

local done = replayed(request)
if done == REFUSED then
  return fail(E.NEPS_LEASE_LOST, id)
elseif done and done:sub(1, #FINISHED) == FINISHED then
  return already_reported(done:sub(#FINISHED + 2))
elseif done then
  return done
end

-- Check everything before the first write.
local clear, pos = take_list(9)
local set, err_fields
if pos then
  set, pos = take_list(pos)
end
if pos then
  err_fields, pos = take_list(pos)
end
if err_fields == nil or pos ~= #ARGV + 1 or #set == 0 then
  return fail(E.NEPS_BAD_ARGUMENT, 'report arguments are malformed')
end
if redis.call('EXISTS', key) == 0 then
  return fail(E.NEPS_TRIAL_NOT_FOUND, id)
end
local current = redis.call('HMGET', key, 'state', 'token')
local held = current[1] == 'evaluating' and current[2] or ''
if token ~= held or HAS_RESULT[current[1]] then
  -- Deliberately the only writes of a refused report: the result is kept
  -- as an event so nobody's work vanishes without a trace.
  local late = {'state', state}
  for i = 1, #set, 2 do
    if set[i] == 'objective_to_minimize' then
      table.insert(late, set[i])
      table.insert(late, set[i + 1])
    end
  end
  emit(events, maxlen, 'late_report', id, worker_id, unpack(late))
  if token == held then
    remember(request, FINISHED .. ' ' .. current[1], request_ttl)
    return already_reported(current[1])
  end
  remember(request, REFUSED, request_ttl)
  return fail(E.NEPS_LEASE_LOST, id)
end

rewrite(key, id, state, ARGV[5], now_ms() + (lease_ms or 0), clear, set, idx,
        counts)
if #err_fields > 0 then
  redis.call('XADD', errors, '*', unpack(err_fields))
end
emit(events, maxlen, 'reported', id, worker_id, 'state', state)

remember(request, 'OK', request_ttl)
return 'OK'
