-- Shared by every lane script (prepended to each): ARGV[1] packs (block hash, slot) records,
-- ARGV[2] is H (bytes of a hash), a slot is S bytes; KEYS are lane:slot, lane:taken, lane:arena.
local packed, H, S = ARGV[1], tonumber(ARGV[2]), 28
-- The (block hash, slot) records of ARGV[1], in order.
local function blocks()
  local i = 1 - (H + S)
  return function()
    i = i + H + S
    if i <= #packed then
      return string.sub(packed, i, i + H - 1), string.sub(packed, i + H, i + H + S - 1)
    end
  end
end
-- '1' or '0' per record: what test(hash, slot) says.
local function flags(test)
  local out = {}
  for h, slot in blocks() do out[#out + 1] = test(h, slot) and '1' or '0' end
  return table.concat(out)
end
local function forget(h, slot)
  if redis.call('HGET', KEYS[1], h) == slot then redis.call('HDEL', KEYS[1], h) end
end
