-- The checkpoint remembers which record it follows, so a projector resuming on
-- another log (a recreated topic, a wiped data directory) stops with an error
-- instead of skipping that log's first records.
ALTER TABLE tasker_projection_checkpoints ADD COLUMN last_record BYTEA;
ALTER TABLE tasker_projection_checkpoints ADD COLUMN last_record_position BIGINT;
COMMENT ON COLUMN tasker_projection_checkpoints.last_record IS
    'BLAKE3 of the payload of the record at last_record_position';
COMMENT ON COLUMN tasker_projection_checkpoints.last_record_position IS
    'position - 1 when last_record was written; a projector that does not write them leaves them behind the position, and they are not used';
