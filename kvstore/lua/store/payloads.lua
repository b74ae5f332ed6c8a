-- ARGV: prefix, refs. Every payload the index names: {DRAM payloads (only if refs), disk
-- payloads}.
local refs = ARGV[2] == '1'
local blocks = redis.call('ZRANGE', LRU, 0, -1)
for _, h in ipairs(redis.call('ZRANGE', DISK_LRU, 0, -1)) do blocks[#blocks + 1] = h end
for _, h in ipairs(redis.call('HKEYS', PINS)) do blocks[#blocks + 1] = h end
local dram, disk = {}, {}
for _, h in ipairs(blocks) do
  local payload = redis.call('GET', data_key(h))
  if payload and refs then dram[#dram + 1] = payload end
  payload = redis.call('GET', disk_key(h))
  if payload then disk[#disk + 1] = payload end
end
return {dram, disk}
