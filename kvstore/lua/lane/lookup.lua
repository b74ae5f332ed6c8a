local out, none = {}, string.rep(string.char(0), S)
for i = 1, #packed, H do
  out[#out + 1] = redis.call('HGET', KEYS[1], string.sub(packed, i, i + H - 1)) or none
end
return table.concat(out)
