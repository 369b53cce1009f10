"""The OpenAI-compatible HTTP API: another face of the router, beside gRPC.

`GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (streamed as server-sent
events with `stream: true`), and `GET /health`. A request's JSON becomes the same
`caravan.v1.GenerateRequest` a gRPC client sends (`requests`), checked by the same rules
(`cluster.api.validate`), admitted by the same queue and run by the same `Inference.stream`; only
the shapes on the wire differ (`responses`, `errors`). `app` holds the routes, `server` runs them
with uvicorn on the router's own event loop.
"""
