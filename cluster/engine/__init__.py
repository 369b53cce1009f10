"""One replica's brain, with no Ray and no gRPC: scheduler, KV blocks and prefix cache, the step loop,
the offline driver, and the one executor interface below them."""
