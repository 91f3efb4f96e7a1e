"""The server's embedding model. It lives in llmos.models.embedder, below the kernel's
semantic memory and the server alike; this name stays for the server code that imports it."""

from llmos.models.embedder import Embedder

__all__ = ["Embedder"]
