-- Only where the name is still that slot (a newer slot of the block stays).
for h, slot in blocks() do
  forget(h, slot)
  redis.call('SREM', KEYS[2], slot)
end
return 0
