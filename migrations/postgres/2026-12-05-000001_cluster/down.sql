DO $$
DECLARE
    t TEXT;
BEGIN
    FOR t IN
        SELECT event_object_table FROM information_schema.triggers
        WHERE trigger_name = 'shers_fence' AND trigger_schema = current_schema()
        GROUP BY event_object_table
    LOOP
        EXECUTE format('DROP TRIGGER shers_fence ON %I', t);
    END LOOP;
END
$$;
DROP FUNCTION shers_fence();
DROP TABLE shard_handovers;
DROP TABLE shard_leases;
DROP TABLE cluster_nodes;
