DROP TABLE api_tokens;
DROP TABLE event_sequence;
DROP TABLE events;
