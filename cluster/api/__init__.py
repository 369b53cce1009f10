"""The front door: the gRPC server and its transport, inference, admin, health, admission, validation,
tokenizer, text streaming and metrics."""
