-- A node's incarnation: the process now running under a node id (`instance`, fresh at every
-- start) and the hash of the credential that process presents to the other nodes. A lease is
-- held by one incarnation (`holder_instance`): a node restarted under its id neither inherits
-- nor is routed what its previous process held, and its previous credential stops working.
ALTER TABLE cluster_nodes ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE cluster_nodes ADD COLUMN credential_hash TEXT;
ALTER TABLE shard_leases ADD COLUMN holder_instance TEXT;
