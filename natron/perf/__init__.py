"""`natron perf`: natron's own load generator, perf_analyzer's core in Python and asyncio, over
HTTP (JSON and binary tensors), gRPC, the WebSocket and straight NATS."""
