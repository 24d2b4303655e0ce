-- emit(events_key, maxlen, event, trial_id, worker_id, ...): append one
-- transition to the run's capped event stream. Extra field/value pairs may
-- follow. An empty trial or worker id is left out.
local function emit(events_key, maxlen, event, trial_id, worker_id, ...)
  local entry = {'event', event}
  if trial_id ~= nil and trial_id ~= '' then
    table.insert(entry, 'trial_id')
    table.insert(entry, trial_id)
  end
  if worker_id ~= nil and worker_id ~= '' then
    table.insert(entry, 'worker_id')
    table.insert(entry, worker_id)
  end
  for _, v in ipairs({...}) do
    table.insert(entry, v)
  end
  return redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', unpack(entry))
end
