-- Presence shared by every server instance on this database.
--
-- Each instance holds a lease that it renews (`expires_at`); its sessions are
-- live only while its lease is. Lists read the sessions of every instance
-- whose lease has not expired, so an instance that dies without cleaning up
-- drops out of every list when its lease runs out, and the next instance to
-- renew deletes its rows.

CREATE TABLE instances (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stable across restarts of one deployment slot (host:port by default), so
    -- that a restarted instance can remove what its previous life left.
    name       text        NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    renewed_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX instances_name_idx ON instances (name);
CREATE INDEX instances_expires_at_idx ON instances (expires_at);

CREATE TABLE sessions (
    instance_id      bigint      NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    session_id       bigint      NOT NULL,
    peer             text        NOT NULL,
    connected_at     timestamptz NOT NULL,
    vm_id            text        REFERENCES vms (vm_id) ON DELETE SET NULL,
    authenticated_at timestamptz,
    -- Bumped by every change of the session, so that a late write of an older
    -- state never overwrites a newer one.
    version          bigint      NOT NULL,
    PRIMARY KEY (instance_id, session_id)
);

CREATE INDEX sessions_vm_id_idx ON sessions (vm_id);
