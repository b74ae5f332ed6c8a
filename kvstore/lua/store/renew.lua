-- ARGV: prefix, ttl_ms, owner. Renews the owner's lease; 1 if it holds pins, else 0.
reap_expired()
if redis.call('EXISTS', owner_pins_key(ARGV[3])) == 0 then return 0 end
renew(ARGV[3], tonumber(ARGV[2]))
return 1
