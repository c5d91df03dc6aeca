"""The OpenAI-compatible HTTP server (``flashdecode serve``) over one ``AsyncLLMEngine``.

serve.py     the command: add_arguments / run (FastAPI and uvicorn imported only there)
app.py       build_app: routes, OpenAI-shaped errors, API key and body-size guard, access log
handlers.py  the endpoints' logic: prompts and SamplingParams in, responses and stream chunks out
protocol.py  the OpenAI request and response bodies as pydantic models
streaming.py server-sent events, and cancellation that reaches the engine on client disconnect
metrics.py   Prometheus metrics in a registry per app
errors.py    the OpenAI error body and the mapping of flashdecode's errors to statuses
"""
