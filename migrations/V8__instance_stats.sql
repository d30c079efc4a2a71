-- Each instance's figures, written with every renewal of its lease, so that
-- one query answers `stats` for the whole fleet. NULL until the first
-- renewal after joining, a moment after start.
ALTER TABLE instances ADD COLUMN stats jsonb;
