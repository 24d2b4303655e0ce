-- now_ms(): the server's clock in milliseconds. Leases use it rather than a
-- worker's clock, so clock skew between machines cannot shorten a lease.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
