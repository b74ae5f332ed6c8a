-- ARGV: prefix, ttl_ms, owner, hashes. Returns {'missing', hash} (nothing pinned) or
-- {'ok', tiers ('dram'/'disk' per hash), payloads}.
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
