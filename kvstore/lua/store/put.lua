-- ARGV: prefix, capacity, disk_capacity, ttl_ms, owner, refs ('1' when DRAM payloads name
-- bytes stored elsewhere, which the caller must free), n, n listed hashes (with repeats, in
-- order), m, m (hash, DRAM payload) pairs for the blocks the caller wrote, then
-- (hash, disk payload) pairs: disk copies the caller made of DRAM blocks to demote ('' to
-- drop the block instead).
-- Returns {'retry', missing hashes} when an absent block came without a payload (the caller
-- writes those and calls again); {'demote', hash, DRAM payload, ...} when DRAM victims need
-- disk copies first (same); {'full', num_new, num_free, num_evictable} when eviction cannot
-- make room (nothing changed); else {'ok', hashes whose stored payload is the caller's,
-- DRAM payloads to free (only if refs), disk payloads to free}.
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
