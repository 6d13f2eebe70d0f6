-- A node's incarnation: the process now running under a node id (`instance`, fresh at every
-- start). A lease is held by one incarnation (`holder_instance`): a node restarted under its id
-- is not routed what its previous process held.
ALTER TABLE cluster_nodes ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE shard_leases ADD COLUMN holder_instance TEXT;
