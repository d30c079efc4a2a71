-- Every change event for `watch` is also kept in `events`, numbered by
-- `seq`, in the same transaction as the change it reports: a watcher that
-- was away resumes after the last `seq` it saw (`watch {"since": SEQ}`), and
-- an instance whose listening connection dropped fills the gap from here.
--
-- `seq` must follow commit order, or a watcher that saw N could later miss
-- an N-1 that committed after N. Publishing therefore takes one advisory
-- lock, held to the commit, and every trigger that publishes is deferred to
-- the commit: publishing transactions commit one at a time, each holding
-- the lock only for its commit, after all of its other locks are taken (so
-- that no deadlock can go through it). NOTIFY follows the same order.

CREATE SEQUENCE events_seq AS bigint;

CREATE TABLE events (
    seq   bigint      PRIMARY KEY,
    at    timestamptz NOT NULL,
    event text        NOT NULL,
    -- The event line as published, `seq` included.
    line  text        NOT NULL
);

CREATE INDEX events_at_idx ON events (at);

-- Events older than the retention are deleted; `upto` is the highest `seq`
-- deleted, so that a `since` below it is known to have missed events.
CREATE TABLE events_pruned (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),
    upto bigint  NOT NULL
);
INSERT INTO events_pruned (upto) VALUES (0);

CREATE FUNCTION vmm_publish(event text, data json) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    line text;
BEGIN
    -- 0x766d6d5f65767473: "vmm_evts".
    PERFORM pg_advisory_xact_lock(8533597125428540531);
    n := nextval('events_seq');
    line := json_build_object(
        'event', event, 'data', data, 'at', vmm_ts(clock_timestamp()), 'seq', n)::text;
    INSERT INTO events (seq, at, event, line) VALUES (n, clock_timestamp(), event, line);
    PERFORM pg_notify('vmm_events', line);
END
$$;

CREATE OR REPLACE FUNCTION vmm_vm_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM vmm_publish(
        CASE TG_OP WHEN 'INSERT' THEN 'vm_registered' ELSE 'vm_updated' END,
        json_build_object('vm', vmm_vm_view(NEW.vm_id)));
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION vmm_session_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM vmm_publish('session_opened', vmm_session_json(NEW));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM vmm_publish('session_closed', vmm_session_json(OLD));
    ELSIF OLD.authenticated_at IS NULL AND NEW.authenticated_at IS NOT NULL
          OR OLD.vm_id IS DISTINCT FROM NEW.vm_id AND NEW.authenticated_at IS NOT NULL THEN
        PERFORM vmm_publish('session_authenticated', vmm_session_json(NEW));
    ELSIF OLD.authenticated_at IS NOT NULL AND NEW.authenticated_at IS NULL THEN
        PERFORM vmm_publish('session_logged_out', vmm_session_json(OLD));
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER sessions_events ON sessions;
CREATE CONSTRAINT TRIGGER sessions_events AFTER INSERT OR UPDATE OR DELETE ON sessions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION vmm_session_event();

CREATE OR REPLACE FUNCTION vmm_instance_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.expires_at < now() THEN
        PERFORM vmm_publish('instance_lost', json_build_object(
            'instance_id', OLD.id, 'name', OLD.name,
            'last_renewed_at', vmm_ts(OLD.renewed_at)));
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER instances_lost ON instances;
CREATE CONSTRAINT TRIGGER instances_lost AFTER DELETE ON instances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION vmm_instance_event();
