--[[
reset_trial: put a trial back to pending, forgetting its evaluation
(NePS's `lock_and_reset_trial_by_id`). Its report, evaluation times, lease
and its own entries in the shared errors are removed; other trials' errors
stay (NePS drops them all).

KEYS[1] trial:<id>   hash
KEYS[2] pending      zset
KEYS[3] evaluating   zset
KEYS[4] finished     zset
KEYS[5] counts       hash
KEYS[6] errors       stream
KEYS[7] events       stream
KEYS[8] request      string (this request's reply, for replays)

ARGV[1] trial id
ARGV[2] events stream cap
ARGV[3] request reply lifetime (ms)
ARGV[4..] the fields to delete (report, evaluation and lease fields)

Returns 'OK'.
Errors: NEPS_TRIAL_NOT_FOUND <id>.
Events: reset.
]]

local key, errors, events, request = KEYS[1], KEYS[6], KEYS[7], KEYS[8]
local idx, counts = {KEYS[2], KEYS[3], KEYS[4]}, KEYS[5]
local id, maxlen, request_ttl = ARGV[1], ARGV[2], ARGV[3]

local done = replayed(request)
if done then
  return done
end

if redis.call('EXISTS', key) == 0 then
  return fail(E.NEPS_TRIAL_NOT_FOUND, id)
end

local old = redis.call('HMGET', key, 'state', 'time_sampled')
-- NaN sorts last; a zset score cannot be NaN.
local score = old[2]
if score == nil or score == false or score == 'nan' then
  score = 'inf'
end
local clear = {}
for i = 4, #ARGV do
  table.insert(clear, ARGV[i])
end
if #clear > 0 then
  redis.call('HDEL', key, unpack(clear))
end
redis.call('HSET', key, 'state', 'pending')
move(id, old[1], 'pending', score, idx, counts)
drop_errors(errors, id)
emit(events, maxlen, 'reset', id, '')

remember(request, 'OK', request_ttl)
return 'OK'
