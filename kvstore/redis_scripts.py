"""Lua scripts that make every store operation one atomic step inside Redis.

Redis runs a script without interleaving any other command, so processes on many hosts can
pin, insert, move and evict without locks. Every script takes the namespace prefix as
ARGV[1] and builds its key names from it (so the store is not Redis-Cluster-safe: it wants
one Redis).

redis-py resends a command whose connection broke, so a script may run twice for one call:
each is written so a second run does no harm (pins are per owner and released together;
handles are a set; a put or promotion recognises payloads it already stored).

Block bytes never pass through a script's decisions: a client writes a copy where it must go
(DRAM plane, disk file) *before* the script that makes the copy visible, and frees the old
copy only after the script says nobody indexes it any more. A script that finds its copy
unneeded says so, and the client frees it.

Keys under ``<namespace>:``, with block hashes in hex:

- ``data:<hash>``       the block's DRAM payload (its bytes, or a shared-memory segment name);
                        its presence is the block's presence in DRAM.
- ``disk:<hash>``       the block's disk payload (a file name); a block is in one tier only.
- ``count``             hash: tier (``dram``, ``disk``) -> number of blocks in it.
- ``pins``              hash: block -> pins summed over owners; only pinned blocks appear.
- ``lru``, ``disk_lru`` sorted sets of the unpinned blocks of each tier, scored by when they
                        became unpinned or arrived (a ``clock`` counter, not wall time).
                        Every block is in exactly one of ``pins``, ``lru``, ``disk_lru``.
- ``owner:<o>:pins``    hash: block -> how often owner ``o`` pinned it.
- ``owner:<o>:order``   list: blocks in the order ``o`` first pinned them; release walks it
                        backwards so a request's tail is evicted before its shared prefix.
- ``owners``            set of owners holding pins (to find their keys when wiping).
- ``leases``            sorted set: owner -> lease deadline (ms of the Redis server's clock,
                        so hosts need no common clock). Every script that pins renews it;
                        every script that allocates first releases owners past their
                        deadline (their holder died or hung).
- ``events``            hash of counters: hits, misses, demotions, promotions, evictions,
                        expired_owners.
- ``config``            the namespace's capacities, leases and data plane, as text; every
                        handle must open it with the same.
- ``handles``           set of open handle ids; the last one to close wipes the namespace.
"""

from __future__ import annotations

_PRELUDE = """
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
"""

# ARGV: prefix, capacity, disk_capacity, ttl_ms, owner, refs ('1' when DRAM payloads name
# bytes stored elsewhere, which the caller must free), n, n listed hashes (with repeats, in
# order), m, m (hash, DRAM payload) pairs for the blocks the caller wrote, then
# (hash, disk payload) pairs: disk copies the caller made of DRAM blocks to demote ('' to
# drop the block instead).
# Returns {'retry', missing hashes} when an absent block came without a payload (the caller
# writes those and calls again); {'demote', hash, DRAM payload, ...} when DRAM victims need
# disk copies first (same); {'full', num_new, num_free, num_evictable} when eviction cannot
# make room (nothing changed); else {'ok', hashes whose stored payload is the caller's,
# DRAM payloads to free (only if refs), disk payloads to free}.
PUT = (
    _PRELUDE
    + """
local capacity, disk_capacity = tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl_ms, owner, refs = tonumber(ARGV[4]), ARGV[5], ARGV[6] == '1'
local n = tonumber(ARGV[7])
local m = tonumber(ARGV[8 + n])
local payloads, offers = {}, {}
for i = 9 + n, 8 + n + 2 * m, 2 do payloads[ARGV[i]] = ARGV[i + 1] end
for i = 9 + n + 2 * m, #ARGV, 2 do offers[ARGV[i]] = ARGV[i + 1] end
reap_expired()

local listed, is_listed, new, missing, kept = {}, {}, {}, {}, {}
for i = 1, n do
  local h = ARGV[7 + i]
  listed[i] = h
  if not is_listed[h] then
    is_listed[h] = true
    if not holds(h) then
      if payloads[h] then new[#new + 1] = h else missing[#missing + 1] = h end
    elseif refs and payloads[h] and redis.call('GET', data_key(h)) == payloads[h] then
      kept[#kept + 1] = h  -- stored by an earlier run of this same call
    end
  end
end
if #missing > 0 then return {'retry', missing} end

local num_dram = count('dram')
local num_to_evict = num_dram + #new - capacity
local victims = {}
if num_to_evict > 0 then
  -- Oldest unpinned first, skipping blocks this put pins; at most n are skipped.
  for _, h in ipairs(redis.call('ZRANGE', LRU, 0, num_to_evict + n - 1)) do
    if #victims == num_to_evict then break end
    if not is_listed[h] then victims[#victims + 1] = h end
  end
  if #victims < num_to_evict then
    return {'full', #new, capacity - num_dram, #victims}
  end
end
if disk_capacity > 0 then
  local need = {'demote'}
  for _, h in ipairs(victims) do
    if not offers[h] then
      need[#need + 1] = h
      need[#need + 1] = redis.call('GET', data_key(h))
    end
  end
  if #need > 1 then return need end
end

local dram_discard, disk_discard, used = {}, {}, {}
for _, h in ipairs(victims) do
  used[h] = true
  demote(h, offered(offers, h), disk_capacity, is_listed, n, refs, dram_discard, disk_discard)
end
discard_unused_offers(offers, used, disk_discard)
for _, h in ipairs(new) do redis.call('SET', data_key(h), payloads[h]) end
redis.call('HINCRBY', COUNT, 'dram', #new)
for _, h in ipairs(listed) do pin(owner, h) end
renew(owner, ttl_ms)
for _, h in ipairs(new) do kept[#kept + 1] = h end
return {'ok', kept, dram_discard, disk_discard}
"""
)

# ARGV: prefix, ttl_ms, owner, hashes. Returns {'missing', hash} (nothing pinned) or
# {'ok', tiers ('dram'/'disk' per hash), payloads}.
GET = (
    _PRELUDE
    + """
local ttl_ms, owner = tonumber(ARGV[2]), ARGV[3]
reap_expired()
local tiers, payloads = {}, {}
for i = 4, #ARGV do
  local h = ARGV[i]
  local payload = redis.call('GET', data_key(h))
  local tier = 'dram'
  if not payload then
    payload = redis.call('GET', disk_key(h))
    tier = 'disk'
  end
  if not payload then
    event('misses', 1)
    return {'missing', h}
  end
  tiers[#tiers + 1] = tier
  payloads[#payloads + 1] = payload
end
event('hits', #ARGV - 3)
for i = 4, #ARGV do pin(owner, ARGV[i]) end
if #ARGV > 3 then renew(owner, ttl_ms) end
return {'ok', tiers, payloads}
"""
)

# ARGV: prefix, hash. Where a block is now: {tier, payload} or {} when absent.
LOCATE = (
    _PRELUDE
    + """
local h = ARGV[2]
local payload = redis.call('GET', data_key(h))
if payload then return {'dram', payload} end
payload = redis.call('GET', disk_key(h))
if payload then return {'disk', payload} end
return {}
"""
)

# ARGV: prefix, capacity, disk_capacity, refs, hash, its disk payload as the caller read
# it, the DRAM payload the caller wrote for it, then optionally (victim, disk payload): a
# disk copy of the DRAM block to swap down. Moves a (pinned) disk block up to DRAM.
# Returns {'ok'|'stay'|'gone', DRAM payloads to free, disk payloads to free} or
# {'victim', hash, DRAM payload} when DRAM is full and that unpinned block must first get a
# disk copy (the caller makes it and calls again).
PROMOTE = (
    _PRELUDE
    + """
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
"""
)

# ARGV: prefix, owner. Returns how many distinct blocks the owner had pinned.
RELEASE = (
    _PRELUDE
    + """
return release_owner(ARGV[2])
"""
)

# ARGV: prefix, ttl_ms, owner. Renews the owner's lease; 1 if it holds pins, else 0.
RENEW = (
    _PRELUDE
    + """
reap_expired()
if redis.call('EXISTS', owner_pins_key(ARGV[3])) == 0 then return 0 end
renew(ARGV[3], tonumber(ARGV[2]))
return 1
"""
)

# ARGV: prefix, hashes. Returns how many leading hashes are present (in any tier).
MATCH_PREFIX = (
    _PRELUDE
    + """
for i = 2, #ARGV do
  if not holds(ARGV[i]) then
    event('hits', i - 2)
    event('misses', 1)
    return i - 2
  end
end
event('hits', #ARGV - 1)
return #ARGV - 1
"""
)

# ARGV: prefix. Returns, from one consistent moment: {blocks in DRAM, pinned in DRAM,
# blocks on disk, pinned on disk, owners holding pins, event name/count pairs}.
STATS = (
    _PRELUDE
    + """
reap_expired()
local num_dram, num_disk = count('dram'), count('disk')
return {
  num_dram, num_dram - redis.call('ZCARD', LRU),
  num_disk, num_disk - redis.call('ZCARD', DISK_LRU),
  redis.call('SCARD', OWNERS), redis.call('HGETALL', EVENTS),
}
"""
)

# ARGV: prefix, config, handle id. Registers a handle. Returns {'ok'} or
# {'mismatch', the namespace's config}.
OPEN = (
    _PRELUDE
    + """
redis.call('SET', CONFIG, ARGV[2], 'NX')
local config = redis.call('GET', CONFIG)
if config ~= ARGV[2] then return {'mismatch', config} end
redis.call('SADD', HANDLES, ARGV[3])
return {'ok'}
"""
)

# ARGV: prefix, mode, refs ('1'/'0'), handle id. Mode 'close' unregisters the handle and
# wipes the namespace if it was the last; mode 'clear' drops every block and pin but keeps
# the handles. Returns {DRAM payloads to free (only if refs), disk payloads to free}.
DROP = (
    _PRELUDE
    + """
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
"""
)

# ARGV: prefix, refs. Every payload the index names: {DRAM payloads (only if refs), disk
# payloads}.
PAYLOADS = (
    _PRELUDE
    + """
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
"""
)

# ARGV: prefix, payload prefix. Drops every block whose bytes live behind payloads that start
# with the prefix (a p2p handle's server, about to stop: nobody could reach them), pinned
# or not; pins on them stay until their owners release (a get then finds them missing).
# Returns {DRAM payloads, disk payloads} to free.
DROP_SERVED = (
    _PRELUDE
    + """
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
"""
)

SCRIPTS = {
    "drop_served": DROP_SERVED,
    "payloads": PAYLOADS,
    "put": PUT,
    "get": GET,
    "locate": LOCATE,
    "promote": PROMOTE,
    "release": RELEASE,
    "renew": RENEW,
    "match_prefix": MATCH_PREFIX,
    "stats": STATS,
    "open": OPEN,
    "drop": DROP,
}
