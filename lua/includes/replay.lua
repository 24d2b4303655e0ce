-- replayed(request_key): the reply of a write that already took effect, or
-- nil. redis-py re-sends a command whose reply was lost; the request key
-- makes the second run return the first run's reply instead of acting twice.
local function replayed(request_key)
  local done = redis.call('GET', request_key)
  if done then
    return done
  end
  return nil
end

-- remember(request_key, reply, ttl_ms): keep a write's reply for replays.
local function remember(request_key, reply, ttl_ms)
  redis.call('SET', request_key, reply, 'PX', ttl_ms)
end
