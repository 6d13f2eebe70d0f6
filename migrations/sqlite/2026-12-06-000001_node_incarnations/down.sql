ALTER TABLE shard_leases DROP COLUMN holder_instance;
ALTER TABLE cluster_nodes DROP COLUMN instance;
