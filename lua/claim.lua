--[[
claim: the oldest pending trial becomes evaluating for one worker.

The caller names the trials it believes are at the head of the pending
index (it cannot know for sure, and a script may only touch keys it is
given). If the real head is among them, it is claimed; if not, the script
returns the real head so the caller can ask again. No trial is ever given
to two workers: the move out of the pending index is atomic.

KEYS[1] pending       zset (id -> time_sampled)
KEYS[2] evaluating    zset (id -> lease deadline, ms)
KEYS[3] finished      zset
KEYS[4] counts        hash
KEYS[5] events        stream
KEYS[6] request       string (this request's reply, for replays)
KEYS[7..] trial:<id>  hash of each candidate, in the order of ARGV[7..]

ARGV[1] worker id
ARGV[2] time_started (seconds, text, the worker's clock as NePS records it)
ARGV[3] lease length (ms)
ARGV[4] claim token (fences the later report)
ARGV[5] events stream cap
ARGV[6] request reply lifetime (ms)
ARGV[7..] candidate trial ids

Returns {'claimed', id, field, value, ...} with the trial's hash after the
claim; {'empty'} when nothing is pending; {'stale', id, ...} with the ids
at the head of the pending index when no candidate is the head.
Errors: NEPS_TRIAL_NOT_FOUND (the index names a trial whose hash is gone);
NEPS_LEASE_LOST <id> (a replayed claim whose trial is no longer held by it).
Events: claimed.
]]

local pending, evaluating, finished, counts, events, request =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local idx = {pending, evaluating, finished}
local worker_id, time_started, lease_ms, token = ARGV[1], ARGV[2],
  tonumber(ARGV[3]), ARGV[4]
local maxlen, request_ttl = ARGV[5], ARGV[6]

local function key_of(id)
  for i = 7, #ARGV do
    if ARGV[i] == id then
      return KEYS[i]
    end
  end
  return nil
end

-- A replay answers with the trial this request claimed, but only while the
-- claim still stands: if the trial was reset, taken over or removed since,
-- the caller must not believe it holds it.
local done = replayed(request)
if done then
  local key = key_of(done)
  local current = redis.call('HMGET', key, 'state', 'token')
  if current[1] ~= 'evaluating' or current[2] ~= token then
    return fail(E.NEPS_LEASE_LOST, done)
  end
  return {'claimed', done, unpack(redis.call('HGETALL', key))}
end

local head = redis.call('ZRANGE', pending, 0, 0)[1]
if head == nil then
  return {'empty'}
end

local key = key_of(head)
if key == nil then
  local ids = redis.call('ZRANGE', pending, 0, math.max(#ARGV - 7, 7))
  return {'stale', unpack(ids)}
end
if redis.call('EXISTS', key) == 0 then
  return fail(E.NEPS_TRIAL_NOT_FOUND, head)
end

local deadline = now_ms() + lease_ms
move(head, 'pending', 'evaluating', deadline, idx, counts)
redis.call('HSET', key,
  'state', 'evaluating',
  'evaluating_worker_id', worker_id,
  'time_started', time_started,
  'token', token,
  'lease_deadline_ms', deadline)
redis.call('HINCRBY', key, 'attempts', 1)
emit(events, maxlen, 'claimed', head, worker_id)

remember(request, head, request_ttl)
return {'claimed', head, unpack(redis.call('HGETALL', key))}
