"""Lua scripts that make every store operation one atomic step inside Redis.

Redis runs a script without interleaving any other command, so processes on many hosts can
pin, insert and evict without locks. Every script takes the namespace prefix as ARGV[1] and
builds its key names from it (so the store is not Redis-Cluster-safe: it wants one Redis).

redis-py resends a command whose connection broke, so a script may run twice for one call:
each is written so a second run does no harm (pins are per owner and released together;
handles are a set; a put recognises payloads it already stored).

Keys under ``<namespace>:``, with block hashes in hex:

- ``data:<hash>``       the block's payload (bytes or a segment name); its presence is the
                        block's presence.
- ``pins``              hash: block -> pins summed over owners; only pinned blocks appear.
- ``lru``               sorted set of unpinned blocks, scored by when they became unpinned
                        (a ``clock`` counter, not wall time, so hosts need no common clock).
                        Every block is in exactly one of ``pins`` and ``lru``.
- ``owner:<o>:pins``    hash: block -> how often owner ``o`` pinned it.
- ``owner:<o>:order``   list: blocks in the order ``o`` first pinned them; release walks it
                        backwards so a request's tail is evicted before its shared prefix.
- ``owners``            set of owners holding pins (to find their keys when wiping).
- ``config``            the namespace's capacity and data plane, as text; every handle must
                        open it with the same.
- ``handles``           set of open handle ids; the last one to close wipes the namespace.
"""

from __future__ import annotations

_PRELUDE = """
local prefix = ARGV[1]
local PINS, LRU, CLOCK = prefix .. 'pins', prefix .. 'lru', prefix .. 'clock'
local OWNERS = prefix .. 'owners'
local CONFIG, HANDLES = prefix .. 'config', prefix .. 'handles'
local function data_key(h) return prefix .. 'data:' .. h end
local function owner_pins_key(o) return prefix .. 'owner:' .. o .. ':pins' end
local function owner_order_key(o) return prefix .. 'owner:' .. o .. ':order' end

local function pin(owner, h)
  if redis.call('HINCRBY', PINS, h, 1) == 1 then redis.call('ZREM', LRU, h) end
  if redis.call('HINCRBY', owner_pins_key(owner), h, 1) == 1 then
    redis.call('RPUSH', owner_order_key(owner), h)
    redis.call('SADD', OWNERS, owner)
  end
end
"""

# ARGV: prefix, capacity, owner, payloads_are_refs ('1' when payloads name bytes stored
# elsewhere, which the caller must free), n, n listed hashes (with repeats, in order), then
# (hash, payload) pairs for the blocks the caller wrote.
# Returns {'retry', missing hashes} when an absent block came without a payload (the caller
# writes those and calls again), {'full', num_new, num_free, num_evictable} when eviction
# cannot make room (nothing changed), else {'ok', hashes whose stored payload is the
# caller's, evicted payloads (only if refs)}.
PUT = (
    _PRELUDE
    + """
local capacity, owner, payloads_are_refs = tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local n = tonumber(ARGV[5])
local payloads = {}
for i = 6 + n, #ARGV, 2 do payloads[ARGV[i]] = ARGV[i + 1] end

local listed, is_listed, new, missing, kept = {}, {}, {}, {}, {}
for i = 1, n do
  local h = ARGV[5 + i]
  listed[i] = h
  if not is_listed[h] then
    is_listed[h] = true
    local stored = redis.call('EXISTS', data_key(h)) == 1
    if not stored then
      if payloads[h] then new[#new + 1] = h else missing[#missing + 1] = h end
    elseif payloads_are_refs and payloads[h] and redis.call('GET', data_key(h)) == payloads[h] then
      kept[#kept + 1] = h  -- stored by an earlier run of this same call
    end
  end
end
if #missing > 0 then return {'retry', missing} end

local num_blocks = redis.call('ZCARD', LRU) + redis.call('HLEN', PINS)
local num_to_evict = num_blocks + #new - capacity
local victims = {}
if num_to_evict > 0 then
  -- Oldest unpinned first, skipping blocks this put pins; at most n are skipped.
  for _, h in ipairs(redis.call('ZRANGE', LRU, 0, num_to_evict + n - 1)) do
    if #victims == num_to_evict then break end
    if not is_listed[h] then victims[#victims + 1] = h end
  end
  if #victims < num_to_evict then
    return {'full', #new, capacity - num_blocks, #victims}
  end
end

local evicted = {}
for _, h in ipairs(victims) do
  if payloads_are_refs then evicted[#evicted + 1] = redis.call('GET', data_key(h)) end
  redis.call('DEL', data_key(h))
  redis.call('ZREM', LRU, h)
end
for _, h in ipairs(new) do redis.call('SET', data_key(h), payloads[h]) end
for _, h in ipairs(listed) do pin(owner, h) end
for _, h in ipairs(new) do kept[#kept + 1] = h end
return {'ok', kept, evicted}
"""
)

# ARGV: prefix, owner, hashes. Returns {'missing', hash} (nothing pinned) or {'ok', payloads}.
GET = (
    _PRELUDE
    + """
local owner = ARGV[2]
local payloads = {}
for i = 3, #ARGV do
  local payload = redis.call('GET', data_key(ARGV[i]))
  if not payload then return {'missing', ARGV[i]} end
  payloads[#payloads + 1] = payload
end
for i = 3, #ARGV do pin(owner, ARGV[i]) end
return {'ok', payloads}
"""
)

# ARGV: prefix, owner. Returns how many distinct blocks the owner had pinned.
RELEASE = (
    _PRELUDE
    + """
local owner = ARGV[2]
local order = redis.call('LRANGE', owner_order_key(owner), 0, -1)
for i = #order, 1, -1 do
  local h = order[i]
  local num_pins = tonumber(redis.call('HGET', owner_pins_key(owner), h))
  if redis.call('HINCRBY', PINS, h, -num_pins) <= 0 then
    redis.call('HDEL', PINS, h)
    if redis.call('EXISTS', data_key(h)) == 1 then
      redis.call('ZADD', LRU, redis.call('INCR', CLOCK), h)
    end
  end
end
redis.call('DEL', owner_pins_key(owner), owner_order_key(owner))
redis.call('SREM', OWNERS, owner)
return #order
"""
)

# ARGV: prefix, hashes. Returns how many leading hashes are present.
MATCH_PREFIX = (
    _PRELUDE
    + """
for i = 2, #ARGV do
  if redis.call('EXISTS', data_key(ARGV[i])) == 0 then return i - 2 end
end
return #ARGV - 1
"""
)

# ARGV: prefix. Returns {num_blocks, num_pinned_blocks} from one consistent moment.
STATS = (
    _PRELUDE
    + """
local num_pinned = redis.call('HLEN', PINS)
return {redis.call('ZCARD', LRU) + num_pinned, num_pinned}
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

# ARGV: prefix, mode, want_payloads ('1'/'0'), handle id. Mode 'close' unregisters the
# handle and wipes
# the namespace if it was the last; mode 'clear' drops every block and pin but keeps the
# handles. Returns the payloads of the dropped blocks when asked (for the data plane to
# free), else an empty list.
DROP = (
    _PRELUDE
    + """
local mode, want_payloads = ARGV[2], ARGV[3] == '1'
if mode == 'close' then
  redis.call('SREM', HANDLES, ARGV[4])
  if redis.call('SCARD', HANDLES) > 0 then return {} end
end

local blocks = redis.call('ZRANGE', LRU, 0, -1)
for _, h in ipairs(redis.call('HKEYS', PINS)) do blocks[#blocks + 1] = h end
local payloads = {}
for _, h in ipairs(blocks) do
  if want_payloads then
    local payload = redis.call('GET', data_key(h))
    if payload then payloads[#payloads + 1] = payload end
  end
  redis.call('DEL', data_key(h))
end
for _, o in ipairs(redis.call('SMEMBERS', OWNERS)) do
  redis.call('DEL', owner_pins_key(o), owner_order_key(o))
end
redis.call('DEL', PINS, LRU, CLOCK, OWNERS)
if mode == 'close' then redis.call('DEL', HANDLES, CONFIG) end
return payloads
"""
)

SCRIPTS = {
    "put": PUT,
    "get": GET,
    "release": RELEASE,
    "match_prefix": MATCH_PREFIX,
    "stats": STATS,
    "open": OPEN,
    "drop": DROP,
}
