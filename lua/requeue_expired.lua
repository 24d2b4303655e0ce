--[[
requeue_expired: give the trials of dead workers back to the queue.

A trial's lease ends at its `lease_deadline_ms` (server clock) unless its
worker's heartbeat renews it. The caller reads the evaluating index for
deadlines already passed and names those trials (a script may only touch
keys it is given); the script checks each one again under the server clock,
so a trial renewed, reported or reset meanwhile is left alone.

An expired trial that has been claimed fewer times than allowed goes back
to pending, scored by its time_sampled, without its evaluation fields and
claim token: a report its old worker sends later no longer matches and is
fenced off (report.lua). One that has used its last attempt becomes crashed
instead, with a report saying that its worker was lost.

Each lost attempt is appended to the trial's `history` field, a JSON list
of {attempt, worker_id, time_started, lease_deadline_ms, reason}, and not to
the shared errors: NePS's error policy stops workers on the latest shared
error, and a worker that vanished is no fault of the evaluation. The final
crash does go to the shared errors: by then the trial has lost its worker
on every attempt, which NePS would call a crashed evaluation (an evaluation
that runs out of memory kills its worker), and the error policy must see it.

At most one sweep acts at a time: the caller takes the run's sweep lock (a
token with an expiry) before reading the candidates and presents the token
here; a sweep whose token is no longer in the lock writes nothing.

KEYS[1] sweep_lock   string (token of the sweep allowed to act)
KEYS[2] pending      zset
KEYS[3] evaluating   zset (id -> lease deadline, ms)
KEYS[4] finished     zset
KEYS[5] counts       hash
KEYS[6] errors       stream (the shared errors)
KEYS[7] events       stream
KEYS[8] request      string (this request's reply, for replays)
KEYS[9..] trial:<id> hash of each candidate, in the order of ARGV[7..]

ARGV[1] the caller's sweep token
ARGV[2] attempts allowed (NEPS_REDIS_MAX_ATTEMPTS)
ARGV[3] time_end of a trial marked crashed (seconds, text, the caller's
        clock as NePS records it)
ARGV[4] err_type of that crash (the name of the exception class)
ARGV[5] events stream cap
ARGV[6] request reply lifetime (ms)
ARGV[7..] candidate trial ids

Returns {'done', id, outcome, worker_id, attempt, ...}, four values per
trial acted on, outcome 'requeued' or 'crashed'; or {'busy'} when another
sweep holds the lock (nothing was written).
Errors: NEPS_BAD_ARGUMENT (the ids do not match the keys).
Events: lease_expired per trial acted on, with its new state (pending or
crashed) and the attempt that was lost.
]]

local sweep_lock, errors, events, request = KEYS[1], KEYS[6], KEYS[7], KEYS[8]
local idx, counts = {KEYS[2], KEYS[3], KEYS[4]}, KEYS[5]
local token, max_attempts, time_end, err_type = ARGV[1], tonumber(ARGV[2]),
  ARGV[3], ARGV[4]
local maxlen, request_ttl = ARGV[5], ARGV[6]

-- A number field as a JSON number; null unless it is plain decimal text
-- (Python's repr of a finite float or an int).
local function json_number(text)
  if text and (string.match(text, '^%-?%d+%.?%d*$')
      or string.match(text, '^%-?%d+%.?%d*e[%-+]%d+$')) then
    return text
  end
  return 'null'
end

local done = replayed(request)
if done then
  return cjson.decode(done)
end

-- Check the arguments and the lock before the first write.
if #KEYS - 8 ~= #ARGV - 6 or max_attempts == nil then
  return fail(E.NEPS_BAD_ARGUMENT, 'candidates do not match their keys')
end
if redis.call('GET', sweep_lock) ~= token then
  return {'busy'}
end

local now = now_ms()
local reply = {'done'}
for i = 7, #ARGV do
  local id, key = ARGV[i], KEYS[i + 2]
  local t = redis.call('HMGET', key, 'state', 'lease_deadline_ms', 'attempts',
    'evaluating_worker_id', 'time_started', 'time_sampled', 'seq', 'history')
  local deadline = tonumber(t[2])
  if t[1] == 'evaluating' and deadline ~= nil and deadline < now then
    local attempt = math.max(tonumber(t[3]) or 1, 1)
    local worker_id = t[4] or ''
    local entry = '{"attempt": ' .. attempt
      .. ', "worker_id": ' .. (t[4] and cjson.encode(t[4]) or 'null')
      .. ', "time_started": ' .. json_number(t[5])
      .. ', "lease_deadline_ms": ' .. json_number(t[2])
      .. ', "reason": "lease_expired"}'
    -- Appended as text: decoding and re-encoding would round old numbers.
    local history = '[' .. entry .. ']'
    if t[8] then
      history = string.sub(t[8], 1, -2) .. ', ' .. entry .. ']'
    end

    if attempt < max_attempts then
      -- NaN sorts last; a zset score cannot be NaN.
      local score = t[6]
      if not score or score == 'nan' then
        score = 'inf'
      end
      redis.call('HDEL', key, 'token', 'lease_deadline_ms',
        'evaluating_worker_id', 'time_started', 'evaluation_duration',
        'time_submitted', 'time_end')
      redis.call('HSET', key, 'state', 'pending', 'history', history)
      move(id, 'evaluating', 'pending', score, idx, counts)
      emit(events, maxlen, 'lease_expired', id, worker_id,
        'state', 'pending', 'attempt', attempt)
      table.insert(reply, id)
      table.insert(reply, 'requeued')
    else
      local err = "Trial '" .. id .. "' lost its worker ('" .. worker_id
        .. "', lease expired) on attempt " .. attempt .. ' of '
        .. max_attempts .. ' allowed; it is marked crashed.'
      redis.call('HDEL', key, 'token', 'lease_deadline_ms')
      redis.call('HSET', key, 'state', 'crashed', 'history', history,
        'reported_as', 'crashed', 'err', err, 'err_type', err_type,
        'time_end', time_end)
      move(id, 'evaluating', 'crashed', t[7] or 'inf', idx, counts)
      redis.call('XADD', errors, '*', 'trial_id', id, 'worker_id', worker_id,
        'err_type', err_type, 'err', err)
      emit(events, maxlen, 'lease_expired', id, worker_id,
        'state', 'crashed', 'attempt', attempt)
      table.insert(reply, id)
      table.insert(reply, 'crashed')
    end
    table.insert(reply, worker_id)
    table.insert(reply, tostring(attempt))
  end
end

remember(request, cjson.encode(reply), request_ttl)
return reply
