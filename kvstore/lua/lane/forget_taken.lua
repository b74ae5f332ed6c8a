return flags(function(h, slot)
  if redis.call('SREM', KEYS[2], slot) == 0 then return false end
  forget(h, slot)
  return true
end)
