-- ARGV: prefix. Returns, from one consistent moment: {blocks in DRAM, pinned in DRAM,
-- blocks on disk, pinned on disk, owners holding pins, event name/count pairs}.
reap_expired()
local num_dram, num_disk = count('dram'), count('disk')
return {
  num_dram, num_dram - redis.call('ZCARD', LRU),
  num_disk, num_disk - redis.call('ZCARD', DISK_LRU),
  redis.call('SCARD', OWNERS), redis.call('HGETALL', EVENTS),
}
