-- ARGV: prefix, config, handle id. Registers a handle. Returns {'ok'} or
-- {'mismatch', the namespace's config}.
redis.call('SET', CONFIG, ARGV[2], 'NX')
local config = redis.call('GET', CONFIG)
if config ~= ARGV[2] then return {'mismatch', config} end
redis.call('SADD', HANDLES, ARGV[3])
return {'ok'}
