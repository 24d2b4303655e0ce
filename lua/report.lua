--[[
report: store a trial's evaluation result and finish it.

The caller's copy of the trial (its metadata, set complete by NePS's
`Trial.set_complete`, and its report) replaces the stored one. A report
that presents a claim token is fenced: if the trial is no longer evaluating
under that token (its lease expired and another worker took it over), the
late result is recorded as an event and the trial is left untouched. A
report with an error is appended to the shared errors.

KEYS[1] trial:<id>   hash
KEYS[2] pending      zset
KEYS[3] evaluating   zset
KEYS[4] finished     zset
KEYS[5] counts       hash
KEYS[6] errors       stream (the shared errors)
KEYS[7] events       stream
KEYS[8] request      string (this request's reply, for replays)

ARGV[1] trial id
ARGV[2] claim token ('' for an unfenced report)
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
NEPS_BAD_ARGUMENT.
Events: reported; late_report when fenced off.
]]

local key, errors, events, request = KEYS[1], KEYS[6], KEYS[7], KEYS[8]
local idx, counts = {KEYS[2], KEYS[3], KEYS[4]}, KEYS[5]
local id, token, worker_id, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxlen, request_ttl, lease_ms = ARGV[6], ARGV[7], tonumber(ARGV[8])

local done = replayed(request)
if done then
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
if token ~= '' then
  local current = redis.call('HMGET', key, 'state', 'token')
  if current[1] ~= 'evaluating' or current[2] ~= token then
    -- Deliberately the only write of a refused report: the late result is
    -- kept as an event so nobody's work vanishes without a trace.
    emit(events, maxlen, 'late_report', id, worker_id, 'state', state)
    return fail(E.NEPS_LEASE_LOST, id)
  end
end

rewrite(key, id, state, ARGV[5], now_ms() + (lease_ms or 0), clear, set, idx,
        counts)
if #err_fields > 0 then
  redis.call('XADD', errors, '*', unpack(err_fields))
end
emit(events, maxlen, 'reported', id, worker_id, 'state', state)

remember(request, 'OK', request_ttl)
return 'OK'
