-- take_list(pos): ARGV[pos] is a count n; returns the n values after it and
-- the position just past them (nil values when the count is malformed).
local function take_list(pos)
  local n = tonumber(ARGV[pos])
  if n == nil or n < 0 or pos + n > #ARGV then
    return nil, nil
  end
  local values = {}
  for i = pos + 1, pos + n do
    table.insert(values, ARGV[i])
  end
  return values, pos + n + 1
end
