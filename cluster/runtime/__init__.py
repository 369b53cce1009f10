"""Ray actors and processes: placement, shard actors, the Ray executor, replicas and their in-place
repair, the KV budget, the local cluster, and a replica as local processes."""
