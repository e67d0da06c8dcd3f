-- ARGV: the id of the node that stops.
forget(ARGV[1])
return 1
