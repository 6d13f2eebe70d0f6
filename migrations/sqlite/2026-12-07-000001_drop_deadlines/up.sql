-- The generic timer table was never used: offers keep their expiry (`offers.expires_at`), the
-- outbox its next attempt (`notifications.next_attempt_at`), and a wearable its fall watch and
-- offline deadline on its own row (`devices`).
DROP TABLE deadlines;
