-- The audit trail: who did what, from where, and how it went. Never a
-- password or a token. No foreign keys: the trail outlives what it names.
CREATE TABLE audit (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    instance_id bigint,
    peer        text,
    vm_id       text,
    action      text        NOT NULL,
    outcome     text        NOT NULL,
    detail      text        NOT NULL DEFAULT ''
);

CREATE INDEX audit_vm_id_idx ON audit (vm_id, id DESC);
