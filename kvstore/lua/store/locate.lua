-- ARGV: prefix, hash. Where a block is now: {tier, payload} or {} when absent.
local h = ARGV[2]
local payload = redis.call('GET', data_key(h))
if payload then return {'dram', payload} end
payload = redis.call('GET', disk_key(h))
if payload then return {'disk', payload} end
return {}
