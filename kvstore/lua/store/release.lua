-- ARGV: prefix, owner. Returns how many distinct blocks the owner had pinned.
return release_owner(ARGV[2])
