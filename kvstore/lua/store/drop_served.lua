-- ARGV: prefix, payload prefix. Drops every block whose bytes live behind payloads that start
-- with the prefix (a p2p handle's server, about to stop: nobody could reach them), pinned
-- or not; pins on them stay until their owners release (a get then finds them missing).
-- Returns {DRAM payloads, disk payloads} to free.
local served = ARGV[2]
local function is_served(payload) return payload and payload:sub(1, #served) == served end
local blocks = redis.call('ZRANGE', LRU, 0, -1)
for _, h in ipairs(redis.call('ZRANGE', DISK_LRU, 0, -1)) do blocks[#blocks + 1] = h end
for _, h in ipairs(redis.call('HKEYS', PINS)) do blocks[#blocks + 1] = h end
local dram, disk = {}, {}
for _, h in ipairs(blocks) do
  local payload = redis.call('GET', data_key(h))
  if is_served(payload) then
    dram[#dram + 1] = payload
    redis.call('DEL', data_key(h))
    redis.call('ZREM', LRU, h)
    redis.call('HINCRBY', COUNT, 'dram', -1)
    event('evictions', 1)
  end
  payload = redis.call('GET', disk_key(h))
  if is_served(payload) then
    disk[#disk + 1] = payload
    redis.call('DEL', disk_key(h))
    redis.call('ZREM', DISK_LRU, h)
    redis.call('HINCRBY', COUNT, 'disk', -1)
    event('evictions', 1)
  end
end
return {dram, disk}
