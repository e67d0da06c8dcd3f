-- The registry's digests (see `cluster`): each node publishes a digest of what every node must
-- agree on, and the nonce of its process. A heartbeat reads how many live nodes publish each
-- digest, not their documents, so that it costs the same at any fleet size. Rows written by
-- an older version have neither: they are read in full, as before.
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS digest TEXT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS nonce TEXT;
CREATE INDEX IF NOT EXISTS nodes_live_until ON nodes (live_until);
