-- The registry of live nodes (see `cluster`): each node's published document (its version,
-- start, and fingerprints of what every node must agree on), live until `live_until` on the
-- database's clock. No secret is ever in a document.
CREATE TABLE IF NOT EXISTS nodes (
    id         TEXT        PRIMARY KEY,
    document   TEXT        NOT NULL,
    live_until TIMESTAMPTZ NOT NULL
);
