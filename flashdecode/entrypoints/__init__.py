"""How users reach the engine: the offline ``LLM`` API, the asyncio ``AsyncLLMEngine`` (the HTTP
server's base), and the ``generate`` / ``chat`` / ``info`` commands."""
