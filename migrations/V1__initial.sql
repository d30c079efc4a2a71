-- VMs and their disks. The CHECK constraints mirror the protocol's limits
-- (vmm_core::protocol::limits), so that nothing out of range is ever stored,
-- whoever writes to the database.

CREATE TABLE vms (
    vm_id         text        PRIMARY KEY
                  CHECK (vm_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    ram           integer     NOT NULL CHECK (ram BETWEEN 1 AND 4194304),
    cpu           integer     NOT NULL CHECK (cpu BETWEEN 1 AND 1024),
    password_hash text        NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz
);

CREATE TABLE disks (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_id      text        NOT NULL REFERENCES vms (vm_id) ON DELETE CASCADE,
    disk_size  integer     NOT NULL CHECK (disk_size BETWEEN 1 AND 1048576),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A VM's disks, in id order: every VmView is built from this.
CREATE INDEX disks_vm_id_id_idx ON disks (vm_id, id);
