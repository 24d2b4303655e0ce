-- rewrite(key, id, state, pending_score, deadline, clear, set, idx, counts):
-- replace a stored trial's fields with a caller's copy of it and move it to
-- the index of its new state. `clear` names fields the new copy lacks, `set`
-- is a flat field/value list that includes 'state'. An evaluating trial is
-- scored by its lease deadline, a pending one by time_sampled, any other by
-- creation order.
local function rewrite(key, id, state, pending_score, deadline, clear, set, idx,
                       counts)
  local old_state = redis.call('HGET', key, 'state')
  local score = pending_score
  if state == 'evaluating' then
    score = deadline
  elseif state ~= 'pending' then
    score = redis.call('HGET', key, 'seq')
  end
  if #clear > 0 then
    redis.call('HDEL', key, unpack(clear))
  end
  redis.call('HSET', key, unpack(set))
  if state == 'evaluating' then
    redis.call('HSET', key, 'lease_deadline_ms', deadline)
  end
  move(id, old_state, state, score, idx, counts)
end
