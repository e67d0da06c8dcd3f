-- Copies a cutoff (tiered refill): it only rises. KEYS: cutoff. ARGV: cutoff_ms, until_ms.
raise_cutoff(KEYS[1], ARGV[1], ARGV[2])
return 1
