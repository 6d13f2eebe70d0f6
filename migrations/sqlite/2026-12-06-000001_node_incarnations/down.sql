ALTER TABLE shard_leases DROP COLUMN holder_instance;
ALTER TABLE cluster_nodes DROP COLUMN credential_hash;
ALTER TABLE cluster_nodes DROP COLUMN instance;
