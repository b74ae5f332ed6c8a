-- ARGV: prefix, mode, refs ('1'/'0'), handle id. Mode 'close' unregisters the handle and
-- wipes the namespace if it was the last; mode 'clear' drops every block and pin but keeps
-- the handles. Returns {DRAM payloads to free (only if refs), disk payloads to free}.
local mode, refs = ARGV[2], ARGV[3] == '1'
if mode == 'close' then
  redis.call('SREM', HANDLES, ARGV[4])
  if redis.call('SCARD', HANDLES) > 0 then return {{}, {}} end
end

local blocks = redis.call('ZRANGE', LRU, 0, -1)
for _, h in ipairs(redis.call('ZRANGE', DISK_LRU, 0, -1)) do blocks[#blocks + 1] = h end
for _, h in ipairs(redis.call('HKEYS', PINS)) do blocks[#blocks + 1] = h end
local dram_discard, disk_discard = {}, {}
for _, h in ipairs(blocks) do
  local payload = redis.call('GET', data_key(h))
  if payload and refs then dram_discard[#dram_discard + 1] = payload end
  payload = redis.call('GET', disk_key(h))
  if payload then disk_discard[#disk_discard + 1] = payload end
  redis.call('DEL', data_key(h), disk_key(h))
end
for _, o in ipairs(redis.call('SMEMBERS', OWNERS)) do
  redis.call('DEL', owner_pins_key(o), owner_order_key(o))
end
redis.call('DEL', PINS, LRU, DISK_LRU, CLOCK, COUNT, OWNERS, LEASES)
if mode == 'close' then redis.call('DEL', HANDLES, CONFIG, EVENTS) end
return {dram_discard, disk_discard}
