-- Whole: the block still has that slot, and its arena is still registered.
return flags(function(h, slot)
  if redis.call('HGET', KEYS[1], h) ~= slot then return false end
  if redis.call('HEXISTS', KEYS[3], string.sub(slot, 1, 16)) == 0 then return false end
  redis.call('SADD', KEYS[2], slot)
  return true
end)
