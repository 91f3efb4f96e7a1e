"""Tools an LLM can call: the registry, built-in tools, MCP servers and the worker pool that runs them."""
