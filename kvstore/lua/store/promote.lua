-- ARGV: prefix, capacity, disk_capacity, refs, hash, its disk payload as the caller read
-- it, the DRAM payload the caller wrote for it, then optionally (victim, disk payload): a
-- disk copy of the DRAM block to swap down. Moves a (pinned) disk block up to DRAM.
-- Returns {'ok'|'stay'|'gone', DRAM payloads to free, disk payloads to free} or
-- {'victim', hash, DRAM payload} when DRAM is full and that unpinned block must first get a
-- disk copy (the caller makes it and calls again).
local capacity, disk_capacity, refs = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local h, seen_disk, new_dram = ARGV[5], ARGV[6], ARGV[7]
local offers = {}
if ARGV[8] then offers[ARGV[8]] = ARGV[9] end
local dram_discard, disk_discard, used = {}, {}, {}

local function finish(status)
  discard_unused_offers(offers, used, disk_discard)
  return {status, dram_discard, disk_discard}
end
local function keep_nothing(status)
  if redis.call('GET', data_key(h)) ~= new_dram then dram_discard[#dram_discard + 1] = new_dram end
  return finish(status)
end

if redis.call('GET', data_key(h)) == new_dram then return finish('ok') end  -- a rerun
if redis.call('GET', disk_key(h)) ~= seen_disk then return keep_nothing('gone') end
local victim = nil
if count('dram') >= capacity then
  victim = redis.call('ZRANGE', LRU, 0, 0)[1]
  if not victim then return keep_nothing('stay') end  -- DRAM is all pinned
  if not offers[victim] then
    return {'victim', victim, redis.call('GET', data_key(victim))}
  end
end
-- Move h up first: the disk slot it frees is the one the victim takes.
redis.call('DEL', disk_key(h))
redis.call('HINCRBY', COUNT, 'disk', -1)
disk_discard[#disk_discard + 1] = seen_disk
if victim then
  used[victim] = true
  demote(victim, offered(offers, victim), disk_capacity, {}, 0, refs, dram_discard,
         disk_discard)
end
redis.call('SET', data_key(h), new_dram)
redis.call('HINCRBY', COUNT, 'dram', 1)
if redis.call('HEXISTS', PINS, h) == 0 then  -- the caller's lease ran out meanwhile
  redis.call('ZREM', DISK_LRU, h)
  redis.call('ZADD', LRU, redis.call('INCR', CLOCK), h)
end
event('promotions', 1)
return finish('ok')
