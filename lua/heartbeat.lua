--[[
heartbeat: renew the leases of the trials one worker holds, and record that
the worker is alive.

A worker's heartbeat thread sends this every few seconds, however long its
evaluations run. A lease is renewed only while the trial is still evaluating
under the claim token the worker holds; a trial whose lease expired and was
requeued, or that was reset, reported or claimed by another worker, is named
in the reply instead, so the worker learns that it lost the trial. A renewal
never shortens a lease: a trial claimed with a longer lease keeps it.

KEYS[1] evaluating    zset (id -> lease deadline, ms)
KEYS[2] worker_info   hash (worker id -> JSON record)
KEYS[3] request       string (this request's reply, for replays)
KEYS[4..] trial:<id>  hash of each held trial, in the order of the ids below

ARGV[1] worker id
ARGV[2] request reply lifetime (ms)
ARGV[3..] three values per held trial: id, claim token, lease length (ms)

Returns the ids of the trials whose lease was lost (empty when all were
renewed).
Errors: NEPS_BAD_ARGUMENT (the trial values do not match the keys).
Events: none; a heartbeat is not a transition. The worker record's
`last_heartbeat` (server clock, seconds) shows it instead.
]]

local evaluating, worker_info, request = KEYS[1], KEYS[2], KEYS[3]
local worker_id, request_ttl = ARGV[1], ARGV[2]

-- A reply is kept as the lost ids, one a line (ids hold no control
-- characters).
local function split_lines(text)
  local ids = {}
  for id in string.gmatch(text, '[^\n]+') do
    table.insert(ids, id)
  end
  return ids
end

local done = replayed(request)
if done then
  return split_lines(done)
end

-- Check the arguments before the first write.
if (#ARGV - 2) ~= 3 * (#KEYS - 3) then
  return fail(E.NEPS_BAD_ARGUMENT, 'held trials do not match their keys')
end
for i = 3, #ARGV, 3 do
  if tonumber(ARGV[i + 2]) == nil then
    return fail(E.NEPS_BAD_ARGUMENT, 'lease length is not a number')
  end
end

local now = now_ms()
local lost = {}
for i = 3, #ARGV, 3 do
  local id, token, lease_ms = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local key = KEYS[4 + (i - 3) / 3]
  local current = redis.call('HMGET', key, 'state', 'token', 'lease_deadline_ms')
  if current[1] == 'evaluating' and current[2] == token then
    local deadline = math.max(tonumber(current[3]) or 0, now + lease_ms)
    redis.call('HSET', key, 'lease_deadline_ms', deadline)
    redis.call('ZADD', evaluating, deadline, id)
  else
    table.insert(lost, id)
  end
end

-- Only a registered worker has a record to update; a malformed one is left
-- as it is rather than failing the renewals above.
local raw = redis.call('HGET', worker_info, worker_id)
if raw then
  local ok, record = pcall(cjson.decode, raw)
  if ok and type(record) == 'table' then
    record['last_heartbeat'] = now / 1000
    redis.call('HSET', worker_info, worker_id, cjson.encode(record))
  end
end

remember(request, table.concat(lost, '\n'), request_ttl)
return lost
