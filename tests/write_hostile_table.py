"""Write a hostile dataflow table into the user's cache directory (not a test; CI runs it before the
suite): every linear shape of the embedded model on an approximate kernel at every M, for 1 and 2
threads. Were any test to read the user's cache, its exact parity checks would fail; the suite's
autouse ``isolated_cache_dir`` fixture is what keeps it out.

    python tests/write_hostile_table.py    # prints the paths it wrote
"""

from __future__ import annotations

import os

import torch

from flashdecode.layers.dataflow import DataflowTable, ShapeResult, fingerprint, table_path
from flashdecode.models.decoder import Decoder
from flashdecode.models.loader import load_model
from flashdecode.tools.tune import distinct_linears

APPROX_FIRST = ("dequant_bf16", "native_q8", "native_i8", "torch_bf16_cast")  # round weights or activations


def hostile_plan(names: list[str]) -> list[tuple[int, str]]:
    approx = [n for n in APPROX_FIRST if n in names]
    return [(1, approx[0] if approx else names[-1])]


def main() -> None:
    if "FLASHDECODE_CACHE_DIR" in os.environ:
        raise SystemExit("unset FLASHDECODE_CACHE_DIR: the point is the user's own cache directory")
    linears = distinct_linears(Decoder(load_model(), torch.float32, dataflow="off").linears())
    shapes = {
        key: ShapeResult(hostile_plan(lin.candidates(allow_approx=True)), {}, [], allow_approx=True)
        for key, lin in linears.items()
    }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        path = DataflowTable(fingerprint(threads), shapes).save(table_path(fingerprint(threads)))
        print(path)


if __name__ == "__main__":
    main()
