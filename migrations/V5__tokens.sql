-- Session tokens: issued by `authenticate`, stored only as SHA-256 digests,
-- valid until `expires_at` or until `logout` revokes them.
CREATE TABLE tokens (
    token_hash bytea       PRIMARY KEY,
    vm_id      text        NOT NULL REFERENCES vms (vm_id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX tokens_expires_at_idx ON tokens (expires_at);
