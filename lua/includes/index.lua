-- index_of(state, pending, evaluating, finished): the state index that holds
-- a trial in `state`. Every trial is in exactly one of the three.
local function index_of(state, pending_key, evaluating_key, finished_key)
  if state == 'pending' then
    return pending_key
  elseif state == 'evaluating' then
    return evaluating_key
  end
  return finished_key
end

-- move(id, old_state, new_state, score, idx, counts_key): take a trial out of
-- its old index (old_state false for a new trial) and into the new one, and
-- keep the per-state counts in step. `idx` is {pending, evaluating, finished}.
local function move(id, old_state, new_state, score, idx, counts_key)
  if old_state then
    redis.call('ZREM', index_of(old_state, idx[1], idx[2], idx[3]), id)
    redis.call('HINCRBY', counts_key, old_state, -1)
  end
  redis.call('ZADD', index_of(new_state, idx[1], idx[2], idx[3]), score, id)
  redis.call('HINCRBY', counts_key, new_state, 1)
end

-- drop_errors(errors_key, id): delete the trial's entries from the shared
-- errors. Reset and remove use it; the stream holds errors only, so it is
-- short next to the run.
local function drop_errors(errors_key, id)
  local entries = redis.call('XRANGE', errors_key, '-', '+')
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'trial_id' and fields[i + 1] == id then
        redis.call('XDEL', errors_key, entry[1])
      end
    end
  end
end
