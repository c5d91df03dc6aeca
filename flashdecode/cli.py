"""``flashdecode``: the command table, the one module above every layer.

Each command lives with the code it drives: ``generate``, ``chat`` and ``info`` in
entrypoints/cli.py; ``serve`` in entrypoints/server/; ``roofline``, ``bench`` (and ``bench serve``),
``calibrate`` and ``tune`` in tools/. Bad input never produces a traceback: every
``FlashDecodeError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .entrypoints import cli as engine_commands
from .entrypoints.server import serve
from .errors import FlashDecodeError
from .tools import bench, bench_serve, calibrate, roofline, tune

EXIT_BAD_INPUT = 2

TOOLS = {
    "roofline": (roofline, "this machine's ceilings and the model's bound on tokens/s"),
    "bench": (bench, "offline prefill/decode throughput, latency vs the roofline"),
    "calibrate": (calibrate, "choose the unified softmax max value (phi) for a model"),
    "tune": (tune, "time the linear kernels per shape and M; write this machine's table"),
    "serve": (serve, "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)"),
}
# commands under a tool: ``flashdecode bench serve`` (the tool itself still runs without one)
SUBTOOLS = {
    "bench": {
        "serve": (
            bench_serve,
            "load-test an OpenAI-compatible server: throughput, TTFT, inter-token latency",
        ),
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashdecode", description="FlashDecoding++ LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    engine_commands.add_commands(sub)
    for name, (module, summary) in TOOLS.items():
        p = sub.add_parser(name, help=summary)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
        if name in SUBTOOLS:
            nested = p.add_subparsers(dest=f"{name}_command", metavar="{" + ",".join(SUBTOOLS[name]) + "}")
            for sub_name, (sub_module, sub_summary) in SUBTOOLS[name].items():
                q = nested.add_parser(sub_name, help=sub_summary)
                sub_module.add_arguments(q)
                q.set_defaults(run=sub_module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FlashDecodeError as exc:
        print(f"flashdecode: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
