-- ARGV: prefix, hashes. Returns how many leading hashes are present (in any tier).
for i = 2, #ARGV do
  if not holds(ARGV[i]) then
    event('hits', i - 2)
    event('misses', 1)
    return i - 2
  end
end
event('hits', #ARGV - 1)
return #ARGV - 1
