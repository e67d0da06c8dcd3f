-- The change feed of the revocation view (src/store/feed.rs): every change to a fact that
-- Validate reads notifies channel auth_sidecar_facts with the fact's name, in the same
-- transaction, so the notification is sent when and only when the change commits. TRUNCATE
-- says 'flush'. Names: 'r:' token id, 'c:' subject, 's:' session id, 'f:' family id.

CREATE OR REPLACE FUNCTION auth_sidecar_feed_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_data jsonb;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_data := to_jsonb(OLD);
    ELSE
        row_data := to_jsonb(NEW);
    END IF;
    PERFORM pg_notify('auth_sidecar_facts', TG_ARGV[0] || (row_data ->> TG_ARGV[1]));
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION auth_sidecar_feed_flush() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('auth_sidecar_facts', 'flush');
    RETURN NULL;
END $$;

CREATE TRIGGER auth_sidecar_feed_revoked AFTER INSERT OR UPDATE OR DELETE ON revoked_tokens
    FOR EACH ROW EXECUTE FUNCTION auth_sidecar_feed_notify('r:', 'token_id');
CREATE TRIGGER auth_sidecar_feed_cutoffs AFTER INSERT OR UPDATE OR DELETE ON subject_cutoffs
    FOR EACH ROW EXECUTE FUNCTION auth_sidecar_feed_notify('c:', 'subject');
CREATE TRIGGER auth_sidecar_feed_sessions AFTER INSERT OR UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION auth_sidecar_feed_notify('s:', 'id');
CREATE TRIGGER auth_sidecar_feed_families AFTER INSERT OR UPDATE OR DELETE ON token_families
    FOR EACH ROW EXECUTE FUNCTION auth_sidecar_feed_notify('f:', 'id');

CREATE TRIGGER auth_sidecar_feed_flush_revoked AFTER TRUNCATE ON revoked_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION auth_sidecar_feed_flush();
CREATE TRIGGER auth_sidecar_feed_flush_cutoffs AFTER TRUNCATE ON subject_cutoffs
    FOR EACH STATEMENT EXECUTE FUNCTION auth_sidecar_feed_flush();
CREATE TRIGGER auth_sidecar_feed_flush_sessions AFTER TRUNCATE ON sessions
    FOR EACH STATEMENT EXECUTE FUNCTION auth_sidecar_feed_flush();
CREATE TRIGGER auth_sidecar_feed_flush_families AFTER TRUNCATE ON token_families
    FOR EACH STATEMENT EXECUTE FUNCTION auth_sidecar_feed_flush();
