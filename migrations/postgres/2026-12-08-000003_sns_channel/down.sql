DELETE FROM notifications WHERE channel = 'sns';
ALTER TABLE notifications DROP CONSTRAINT notifications_channel_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_channel_check
    CHECK (channel IN ('sms', 'email', 'webhook'));
