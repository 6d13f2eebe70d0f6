-- The Amazon SNS topic channel: one outbox row per incident and template publishes to the
-- configured topic (`notify.sns_topic_arn`). Mirrors migrations/sqlite.
ALTER TABLE notifications DROP CONSTRAINT notifications_channel_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_channel_check
    CHECK (channel IN ('sms', 'email', 'webhook', 'sns'));
