"""``flashdecode serve``: the OpenAI-compatible HTTP server (``add_arguments`` / ``run``, as the tools).

FastAPI and uvicorn are imported only when the server runs, so other commands start as fast as before.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import Any

from ...config import EngineConfig
from ...errors import FlashDecodeError
from ...models.loader import EMBEDDED_FILE
from ..cli import add_model_args

API_KEY_ENV = "FLASHDECODE_API_KEY"
DEFAULT_MAX_BODY_BYTES = 4 << 20

logger = logging.getLogger("flashdecode.server")

# argparse destinations that are EngineConfig fields under another name
_RENAMED = {"threads": "num_threads"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health and /metrics "
        f"(default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) clients use; the first is reported (default: the --model argument, or "
        "the embedded model's name)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together in one step")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=1024, help="tokens (prefill chunks + decodes) per step"
    )
    p.add_argument("--seed", type=int, default=0, help="engine seed for requests without their own")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body accepted; larger ones get 413 (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Every parsed option named like an ``EngineConfig`` field (or renamed in ``_RENAMED``) is passed
    on, so engine options added to ``add_model_args`` reach the server without an edit here."""
    fields = set(EngineConfig.__dataclass_fields__)
    options: dict[str, Any] = {}
    for name, value in vars(args).items():
        name = _RENAMED.get(name, name)
        if name in fields:
            options[name] = value
    return EngineConfig(**options)


def default_model_name(model: str | None) -> str:
    return model if model is not None else EMBEDDED_FILE.split(".")[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..async_engine import AsyncLLMEngine
    from .app import build_app
    from .handlers import ServerSettings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.max_body_bytes < 1:
        raise FlashDecodeError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    config = engine_config(args)
    names = args.served_model_name or [default_model_name(args.model)]
    logger.info("loading %s", names[0])
    engine = AsyncLLMEngine.from_config(config)
    settings = ServerSettings(
        model_names=list(names),
        model_root=str(engine.engine.config.model) if engine.engine.config.model else EMBEDDED_FILE,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
    )
    app = build_app(engine, settings)
    if api_key is None and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    logger.info(
        "serving %s on http://%s:%d (max_model_len %d)",
        names[0],
        args.host,
        args.port,
        engine.engine.max_model_len,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # the app logs one line per request itself, without prompt text
        log_config=None,  # keep the logging set up above
        timeout_graceful_shutdown=5,
    )
    return 0
