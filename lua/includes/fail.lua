-- fail(code, detail): an error reply whose first word is a code of the
-- shared table E (see errors.py). Return it: `return fail(E.NEPS_BAD_ARGUMENT, 'why')`.
local function fail(code, detail)
  return redis.error_reply(code .. ' ' .. tostring(detail))
end
