-- Failed logins, per key ('vm:<vm_id>' or 'ip:<address>'), shared by every
-- instance so that throttling holds across them.
CREATE TABLE login_failures (
    key           text        PRIMARY KEY,
    failures      integer     NOT NULL,
    last_at       timestamptz NOT NULL,
    blocked_until timestamptz
);
