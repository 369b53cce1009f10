"""Ray Serve glue: names, the application builder, the replica deployment and its client, cache-aware
request routing, the registry, and a client of Serve's controller."""
