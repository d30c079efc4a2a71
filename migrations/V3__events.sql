-- Change events for `watch`, published with NOTIFY on the channel
-- `vmm_events` by triggers, so that every change made through any instance
-- reaches the watchers of every instance, in commit order, at no extra
-- statement for the writer. Each payload is the event line as sent to
-- clients: {"event": ..., "data": {...}, "at": ...}.

CREATE FUNCTION vmm_ts(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- A VM as every reply shows it (the VmView of the protocol).
CREATE FUNCTION vmm_vm_view(id text) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'vm_id', v.vm_id,
        'ram', v.ram,
        'cpu', v.cpu,
        'disks', COALESCE(
            (SELECT json_agg(json_build_object('id', d.id, 'disk_size', d.disk_size) ORDER BY d.id)
             FROM disks d WHERE d.vm_id = v.vm_id),
            '[]'::json),
        'created_at', vmm_ts(v.created_at),
        'updated_at', vmm_ts(v.updated_at))
    FROM vms v WHERE v.vm_id = id
$$;

CREATE FUNCTION vmm_notify(event text, data json) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('vmm_events', json_build_object(
        'event', event, 'data', data, 'at', vmm_ts(clock_timestamp()))::text)
$$;

-- VM events fire at commit, once the VM's disks are written too.
CREATE FUNCTION vmm_vm_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM vmm_notify(
        CASE TG_OP WHEN 'INSERT' THEN 'vm_registered' ELSE 'vm_updated' END,
        json_build_object('vm', vmm_vm_view(NEW.vm_id)));
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER vms_registered AFTER INSERT ON vms
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION vmm_vm_event();
CREATE CONSTRAINT TRIGGER vms_updated AFTER UPDATE ON vms
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at)
    EXECUTE FUNCTION vmm_vm_event();

CREATE FUNCTION vmm_session_json(s sessions) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'session_id', s.session_id,
        'peer', s.peer,
        'connected_at', vmm_ts(s.connected_at),
        'vm_id', s.vm_id,
        'authenticated', s.authenticated_at IS NOT NULL)
$$;

CREATE FUNCTION vmm_session_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM vmm_notify('session_opened', vmm_session_json(NEW));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM vmm_notify('session_closed', vmm_session_json(OLD));
    ELSIF OLD.authenticated_at IS NULL AND NEW.authenticated_at IS NOT NULL
          OR OLD.vm_id IS DISTINCT FROM NEW.vm_id AND NEW.authenticated_at IS NOT NULL THEN
        PERFORM vmm_notify('session_authenticated', vmm_session_json(NEW));
    ELSIF OLD.authenticated_at IS NOT NULL AND NEW.authenticated_at IS NULL THEN
        PERFORM vmm_notify('session_logged_out', vmm_session_json(OLD));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_events AFTER INSERT OR UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION vmm_session_event();

-- An instance removed after its lease ran out was lost; one that left on
-- shutdown was not.
CREATE FUNCTION vmm_instance_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.expires_at < now() THEN
        PERFORM vmm_notify('instance_lost', json_build_object(
            'instance_id', OLD.id, 'name', OLD.name,
            'last_renewed_at', vmm_ts(OLD.renewed_at)));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER instances_lost AFTER DELETE ON instances
    FOR EACH ROW EXECUTE FUNCTION vmm_instance_event();
