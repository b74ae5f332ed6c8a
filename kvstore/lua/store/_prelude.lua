-- Shared by every store script (prepended to each): key names under the namespace prefix
-- ARGV[1], and the pin, lease and eviction helpers.
local prefix = ARGV[1]
local PINS, LRU, DISK_LRU = prefix .. 'pins', prefix .. 'lru', prefix .. 'disk_lru'
local CLOCK, COUNT, EVENTS = prefix .. 'clock', prefix .. 'count', prefix .. 'events'
local OWNERS, LEASES = prefix .. 'owners', prefix .. 'leases'
local CONFIG, HANDLES = prefix .. 'config', prefix .. 'handles'
local function data_key(h) return prefix .. 'data:' .. h end
local function disk_key(h) return prefix .. 'disk:' .. h end
local function owner_pins_key(o) return prefix .. 'owner:' .. o .. ':pins' end
local function owner_order_key(o) return prefix .. 'owner:' .. o .. ':order' end

local function count(tier) return tonumber(redis.call('HGET', COUNT, tier) or '0') end
local function event(name, n) if n ~= 0 then redis.call('HINCRBY', EVENTS, name, n) end end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function holds(h)
  return redis.call('EXISTS', data_key(h)) == 1 or redis.call('EXISTS', disk_key(h)) == 1
end

local function pin(owner, h)
  if redis.call('HINCRBY', PINS, h, 1) == 1 then
    redis.call('ZREM', LRU, h)
    redis.call('ZREM', DISK_LRU, h)
  end
  if redis.call('HINCRBY', owner_pins_key(owner), h, 1) == 1 then
    redis.call('RPUSH', owner_order_key(owner), h)
    redis.call('SADD', OWNERS, owner)
  end
end

local function renew(owner, ttl_ms)
  if ttl_ms > 0 then redis.call('ZADD', LEASES, now_ms() + ttl_ms, owner) end
end

-- An unpinned block queues at the back of its tier's LRU.
local function enqueue(h)
  if redis.call('EXISTS', data_key(h)) == 1 then
    redis.call('ZADD', LRU, redis.call('INCR', CLOCK), h)
  elseif redis.call('EXISTS', disk_key(h)) == 1 then
    redis.call('ZADD', DISK_LRU, redis.call('INCR', CLOCK), h)
  end
end

local function release_owner(owner)
  local order = redis.call('LRANGE', owner_order_key(owner), 0, -1)
  for i = #order, 1, -1 do
    local h = order[i]
    local num_pins = tonumber(redis.call('HGET', owner_pins_key(owner), h))
    if redis.call('HINCRBY', PINS, h, -num_pins) <= 0 then
      redis.call('HDEL', PINS, h)
      enqueue(h)
    end
  end
  redis.call('DEL', owner_pins_key(owner), owner_order_key(owner))
  redis.call('SREM', OWNERS, owner)
  redis.call('ZREM', LEASES, owner)
  return #order
end

local function reap_expired()
  local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now_ms())
  for _, owner in ipairs(expired) do release_owner(owner) end
  event('expired_owners', #expired)
end

-- Makes a disk slot: drops the oldest unpinned disk block not in keep (a set; at most
-- num_keep of them) if the disk is full; its payload goes to disk_discard. False when
-- there is no such block.
local function disk_has_room(disk_capacity, keep, num_keep, disk_discard)
  if count('disk') < disk_capacity then return true end
  local oldest = nil
  for _, h in ipairs(redis.call('ZRANGE', DISK_LRU, 0, num_keep)) do
    if not keep[h] then oldest = h; break end
  end
  if not oldest then return false end
  disk_discard[#disk_discard + 1] = redis.call('GET', disk_key(oldest))
  redis.call('DEL', disk_key(oldest))
  redis.call('ZREM', DISK_LRU, oldest)
  redis.call('HINCRBY', COUNT, 'disk', -1)
  event('evictions', 1)
  return true
end

-- Moves unpinned DRAM block h down to the disk copy disk_payload (false: no disk tier), or
-- drops it when the disk holds only pinned blocks and keep (see disk_has_room). Freed
-- payloads go to the discard lists.
local function demote(h, disk_payload, disk_capacity, keep, num_keep, refs, dram_discard,
                      disk_discard)
  if refs then dram_discard[#dram_discard + 1] = redis.call('GET', data_key(h)) end
  redis.call('DEL', data_key(h))
  redis.call('ZREM', LRU, h)
  redis.call('HINCRBY', COUNT, 'dram', -1)
  if disk_payload and disk_has_room(disk_capacity, keep, num_keep, disk_discard) then
    redis.call('SET', disk_key(h), disk_payload)
    redis.call('ZADD', DISK_LRU, redis.call('INCR', CLOCK), h)
    redis.call('HINCRBY', COUNT, 'disk', 1)
    event('demotions', 1)
  else
    if disk_payload then disk_discard[#disk_discard + 1] = disk_payload end
    event('evictions', 1)
  end
end

-- An offer of '' means "drop the block instead" (the caller could not read it, or gave up
-- racing other writers for victims).
local function offered(offers, h)
  local offer = offers[h]
  if offer == '' then return false end
  return offer or false
end

-- An offered disk copy nobody needs is freed, unless an earlier run of this same call
-- already indexed it.
local function discard_unused_offers(offers, used, disk_discard)
  for h, offer in pairs(offers) do
    if offer ~= '' and not used[h] and redis.call('GET', disk_key(h)) ~= offer then
      disk_discard[#disk_discard + 1] = offer
    end
  end
end
