-- hand_off(lease_key, free_key): give up the optimizer lease and wake one
-- sampler blocked on `free_key` (BLPOP). The list holds at most one
-- element: a release that nobody waited for leaves one behind, and the next
-- waiter merely tries the lease once more at once.
local function hand_off(lease_key, free_key)
  redis.call('DEL', lease_key)
  redis.call('DEL', free_key)
  redis.call('RPUSH', free_key, '1')
end
