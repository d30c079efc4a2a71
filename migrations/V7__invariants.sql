-- Promises that must hold however many connections race on however many
-- instances: each is enforced here, where every writer has to pass.

-- 1. At most 64 disks per VM (vmm_core::protocol::limits::MAX_DISKS).
--
-- Every statement that adds disks to a VM, or moves disks to another VM,
-- first locks the VMs concerned (in one order, so two writers never
-- deadlock), then counts their disks with a fresh snapshot. A second writer
-- of the same VM waits for the first to commit and then counts its disks
-- too. FOR NO KEY UPDATE does not conflict with the KEY SHARE lock that the
-- foreign key takes, so it adds no deadlock with concurrent inserts.
CREATE FUNCTION vmm_disks_per_vm() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    targets text[];
    over    text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT vm_id) INTO targets FROM changed;
    ELSE
        SELECT array_agg(DISTINCT c.vm_id) INTO targets
        FROM changed c JOIN previous p ON p.id = c.id
        WHERE p.vm_id IS DISTINCT FROM c.vm_id;
    END IF;
    IF targets IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM vms WHERE vm_id = ANY (targets) ORDER BY vm_id FOR NO KEY UPDATE;
    SELECT vm_id INTO over FROM disks WHERE vm_id = ANY (targets)
    GROUP BY vm_id HAVING count(*) > 64 LIMIT 1;
    IF over IS NOT NULL THEN
        RAISE EXCEPTION 'a VM has at most 64 disks'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'disks_per_vm';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER disks_per_vm_insert AFTER INSERT ON disks
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION vmm_disks_per_vm();
CREATE TRIGGER disks_per_vm_update AFTER UPDATE ON disks
    REFERENCING OLD TABLE AS previous NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION vmm_disks_per_vm();

-- 2. Login throttling that reserves before it hashes.
--
-- A key ('vm:<id>', 'ip:<address>', 'enroll:<address>') counts `attempts`:
-- those running now (`running`) and those that failed. An attempt reserves
-- its place before any password is checked; a success gives it back, a
-- failure keeps it. So at most `lim` attempts per key run or fail without a
-- quiet window between them, however many arrive at once on however many
-- instances.
ALTER TABLE login_failures RENAME TO login_attempts;
ALTER TABLE login_attempts RENAME COLUMN failures TO attempts;
ALTER TABLE login_attempts ADD COLUMN running integer NOT NULL DEFAULT 0;
ALTER INDEX login_failures_pkey RENAME TO login_attempts_pkey;
-- Keys that have been quiet for a window are pruned by last_at.
CREATE INDEX login_attempts_last_at_idx ON login_attempts (last_at);

-- Which of `keys` refuses an attempt now, if one does: the one blocked the
-- longest, else one full of attempts still running (try again in a second).
-- A key quiet since `quiet` is about to start over, so it refuses nothing.
CREATE FUNCTION vmm_login_refusal(keys text[], lim int, quiet timestamptz)
RETURNS TABLE (retry_after_ms bigint, refused_key text, blocked boolean)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN a.blocked_until > now()
                THEN greatest(ceil(extract(epoch FROM a.blocked_until - now()) * 1000)::bigint, 1)
                ELSE 1000 END,
           a.key,
           a.blocked_until > now()
    FROM login_attempts a
    WHERE a.key = ANY (keys)
      AND NOT (a.last_at < quiet AND coalesce(a.blocked_until < quiet, true))
      AND (a.blocked_until > now() OR a.attempts >= lim AND a.running > 0)
    ORDER BY a.blocked_until DESC NULLS LAST LIMIT 1
$$;

-- Reserves an attempt under every key at once, or under none. Returns one
-- row: all NULL when the attempt may run; else which key refused it, for
-- how long, and whether it is blocked after failures (`blocked`) or only
-- full of attempts still running.
--
-- A key quiet for `win` seconds (and not blocked within them) starts over.
-- A key with `lim` attempts refuses more: while some of them still run, for
-- a moment; once `lim` of them have failed, it is blocked (see
-- vmm_login_failed). Once a block has passed, one attempt at a time may run.
CREATE FUNCTION vmm_login_reserve(keys text[], lim int, win float8)
RETURNS TABLE (retry_after_ms bigint, refused_key text, blocked boolean)
LANGUAGE plpgsql AS $$
DECLARE
    quiet timestamptz := now() - win * interval '1 second';
BEGIN
    -- A key that refuses is seen without a lock or a write, so a flood of
    -- refused attempts costs reads only, in parallel.
    RETURN QUERY
        SELECT * FROM vmm_login_refusal(keys, lim, quiet);
    IF FOUND THEN
        RETURN;
    END IF;
    -- Lock (creating) each key's row, in one order so that two attempts
    -- never deadlock, forgetting the past of a quiet key.
    INSERT INTO login_attempts AS a (key, attempts, last_at)
    SELECT k, 0, now() FROM unnest(keys) AS k ORDER BY k
    ON CONFLICT (key) DO UPDATE SET
        attempts = CASE WHEN a.last_at < quiet AND coalesce(a.blocked_until < quiet, true)
                        THEN 0 ELSE a.attempts END,
        running = CASE WHEN a.last_at < quiet AND coalesce(a.blocked_until < quiet, true)
                       THEN 0 ELSE a.running END,
        blocked_until = CASE WHEN a.last_at < quiet AND coalesce(a.blocked_until < quiet, true)
                             THEN NULL ELSE a.blocked_until END;
    -- Again, now that the rows are locked and fresh: this is the decision.
    RETURN QUERY
        SELECT * FROM vmm_login_refusal(keys, lim, quiet);
    IF FOUND THEN
        RETURN;
    END IF;
    UPDATE login_attempts a
    SET attempts = a.attempts + 1, running = a.running + 1, last_at = now()
    WHERE a.key = ANY (keys);
    -- A few stale keys go with every reservation, so the table stays the
    -- size of what was tried recently. Last, and skipping locked rows, so
    -- that it never waits while holding this attempt's keys.
    DELETE FROM login_attempts WHERE key IN (
        SELECT a.key FROM login_attempts a
        WHERE a.last_at < quiet AND coalesce(a.blocked_until < quiet, true)
        ORDER BY a.last_at LIMIT 8 FOR UPDATE SKIP LOCKED);
    RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::boolean;
END
$$;

-- A reserved attempt failed: it stays counted, and once `lim` attempts of a
-- key have failed the key is blocked for `base` seconds, doubled for each
-- failure past `lim`, at most `cap`. Rows are locked in key order, as every
-- function here locks them, so that no two of them deadlock.
CREATE FUNCTION vmm_login_failed(keys text[], lim int, base float8, cap float8)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM login_attempts WHERE key = ANY (keys) ORDER BY key FOR UPDATE;
    UPDATE login_attempts a SET
        running = greatest(a.running - 1, 0),
        last_at = now(),
        blocked_until = CASE
            WHEN a.attempts - greatest(a.running - 1, 0) >= lim
            THEN now() + least(cap, base * power(2, least(
                     a.attempts - greatest(a.running - 1, 0) - lim, 30))) * interval '1 second'
            ELSE a.blocked_until END
    WHERE a.key = ANY (keys);
END
$$;

-- A reserved attempt succeeded, or never got to check anything: its place
-- is given back; `forget` (the VM's key after a successful login) is cleared.
CREATE FUNCTION vmm_login_release(keys text[], forget text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM login_attempts WHERE key = ANY (keys) ORDER BY key FOR UPDATE;
    UPDATE login_attempts SET attempts = greatest(attempts - 1, 0),
                              running = greatest(running - 1, 0)
    WHERE key = ANY (keys) AND key IS DISTINCT FROM forget;
    DELETE FROM login_attempts WHERE key = forget;
END
$$;

-- 3. Session tokens name a session family: every session that authenticated
-- with the token. Deleting a token (logout, `revoke`, expiry clean-up, or by
-- hand) tells every instance, which ends the family's sessions.
ALTER TABLE tokens ADD COLUMN family bigint;
UPDATE tokens SET family = ('x' || substr(encode(token_hash, 'hex'), 1, 15))::bit(60)::bigint;
ALTER TABLE tokens ALTER COLUMN family SET NOT NULL;
CREATE UNIQUE INDEX tokens_family_idx ON tokens (family);
CREATE INDEX tokens_vm_id_idx ON tokens (vm_id);

CREATE FUNCTION vmm_tokens_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    chunk bigint[];
BEGIN
    -- A NOTIFY payload holds at most 8000 bytes.
    FOR chunk IN
        SELECT array_agg(family) FROM (
            SELECT family, (row_number() OVER ()) / 400 AS part FROM gone) g
        GROUP BY part
    LOOP
        PERFORM vmm_notify('tokens_revoked', json_build_object('families', chunk));
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER tokens_revoked AFTER DELETE ON tokens
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION vmm_tokens_revoked();

-- 4. Audit rows coalesce repeated identical outcomes: `count` of them, the
-- first at `at`, the last at `last_at`.
ALTER TABLE audit ADD COLUMN count bigint NOT NULL DEFAULT 1;
ALTER TABLE audit ADD COLUMN last_at timestamptz;
