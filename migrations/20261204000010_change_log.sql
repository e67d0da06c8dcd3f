-- The change log of the revocation view (src/store/feed.rs), for nodes that reach PostgreSQL
-- through a transaction pooler (PgBouncer), which gives no session to LISTEN on: every change
-- that the change_feed triggers notify also lands here, in the writing transaction, with that
-- transaction's id. A node reads, four times a second through the pool, the rows of the
-- transactions at or after the oldest one that was still running at its previous read, in one
-- statement with the snapshot's horizon: a row is read by the first read after its commit,
-- whatever order transactions commit in. A row goes once it is ten minutes old and its
-- transaction ended before the previous purge's horizon: read by every node by then.
CREATE TABLE IF NOT EXISTS change_log (
    xid  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    fact TEXT        NOT NULL,
    at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS change_log_xid ON change_log (xid);
CREATE INDEX IF NOT EXISTS change_log_at ON change_log (at);

CREATE OR REPLACE FUNCTION auth_sidecar_feed_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_data jsonb;
    fact text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_data := to_jsonb(OLD);
    ELSE
        row_data := to_jsonb(NEW);
    END IF;
    fact := TG_ARGV[0] || (row_data ->> TG_ARGV[1]);
    PERFORM pg_notify('auth_sidecar_facts', fact);
    INSERT INTO change_log (fact) VALUES (fact);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION auth_sidecar_feed_flush() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('auth_sidecar_facts', 'flush');
    INSERT INTO change_log (fact) VALUES ('flush');
    RETURN NULL;
END $$;
