-- As ../0006_checkpoint_last_record.sql: BLAKE3 of the payload of the record at
-- last_record_position, so a projector resuming on another log stops with an error.
ALTER TABLE tasker_projection_checkpoints ADD COLUMN last_record BLOB;
ALTER TABLE tasker_projection_checkpoints ADD COLUMN last_record_position INTEGER;
