for h, slot in blocks() do redis.call('HSET', KEYS[1], h, slot) end
return 0
