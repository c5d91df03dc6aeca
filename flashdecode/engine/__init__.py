"""The engine: scheduling, KV-cache management, model execution and sampling."""
