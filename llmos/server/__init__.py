"""The HTTP interface: an OpenAI-compatible API, the kernel API over running requests,
Prometheus metrics, and the API keys that decide who a caller is and what it may do."""
