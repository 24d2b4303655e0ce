--[[
create_run: create a run, or report the one that exists.

Many workers may start a new run at the same moment. Exactly one of them
creates it; every other one gets the stored run back and compares it with
what it was given (in Python: optimizer info matching follows NePS's rules).

KEYS[1] meta             hash
KEYS[2] optimizer_state  hash
KEYS[3] pipeline_space   string
KEYS[4] events           stream

ARGV[1] schema version of the caller's layout
ARGV[2] optimizer info (JSON)
ARGV[3] pipeline space fingerprint ('' when there is no space)
ARGV[4] time of creation (seconds, text)
ARGV[5] events stream cap (approximate MAXLEN)
ARGV[6] pickled pipeline space ('' unless the caller opted in)
ARGV[7] number of optimizer_state field/value pairs that follow
ARGV[8..] optimizer_state field, value, ...

Returns {'created'}, or {'exists', schema_version, optimizer_info,
space_fingerprint, has_pickled_space ('1' or '0')}.
Errors: NEPS_BAD_ARGUMENT (malformed optimizer_state pairs). A run that
exists is not an error: the caller compares it with what it was given.
Events: created.
]]

local meta, optimizer_state, pipeline_space, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

if redis.call('EXISTS', meta) == 1 then
  local stored = redis.call(
    'HMGET', meta, 'schema_version', 'optimizer_info', 'space_fingerprint')
  local has_space = redis.call('EXISTS', pipeline_space)
  return {'exists', stored[1] or '', stored[2] or '', stored[3] or '',
          tostring(has_space)}
end

-- Check the arguments before the first write.
local n_state = tonumber(ARGV[7])
if n_state == nil or #ARGV ~= 7 + 2 * n_state then
  return fail(E.NEPS_BAD_ARGUMENT, 'optimizer_state pairs do not match their count')
end

redis.call('HSET', meta,
  'schema_version', ARGV[1],
  'optimizer_info', ARGV[2],
  'space_fingerprint', ARGV[3],
  'created_at', ARGV[4],
  'next_seq', 0,
  'next_worker_seq', 0)

local pairs_ = {}
for i = 8, #ARGV do
  table.insert(pairs_, ARGV[i])
end
if #pairs_ > 0 then
  redis.call('HSET', optimizer_state, unpack(pairs_))
end

if ARGV[6] ~= '' then
  redis.call('SET', pipeline_space, ARGV[6])
end

emit(events, ARGV[5], 'created', '', '')
return {'created'}
