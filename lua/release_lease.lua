--[[
release_lease: give up the optimizer lease, if the caller still holds it.
Used when sampling fails before anything is stored; a successful sample
releases the lease inside store_trials.

KEYS[1] optimizer_lease  string
KEYS[2] optimizer_free   list (wakes a sampler waiting for the lease)

ARGV[1] the caller's lease token

Returns 1 if the lease was released, 0 if the caller no longer held it.
Errors: none.
Events: none.
]]

if redis.call('GET', KEYS[1]) == ARGV[1] then
  hand_off(KEYS[1], KEYS[2])
  return 1
end
return 0
