"""A draft model for speculative decoding made from a target's Hugging Face folder: its first N
layers (the embedding, tied head, final norm and tokenizer kept), converted to GGUF as the target was
(tests/model_factory.py's ``hf_to_gguf``, F16) and quantized with llama.cpp's ``llama-quantize``.

    python benchmarks/make_draft_model.py HF_DIR OUT.gguf --layers 6 --type Q4_K_M \\
        --quantize /path/to/llama.cpp/build/bin/llama-quantize
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import model_factory  # noqa: E402  (tests/ is not a package)


def truncate(hf_dir: Path, out_dir: Path, layers: int) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    if not 0 < layers < config["num_hidden_layers"]:
        raise SystemExit(f"--layers must be in [1, {config['num_hidden_layers']}), got {layers}")
    config["num_hidden_layers"] = layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:layers]
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and not f.name.endswith(".index.json"):
            shutil.copy(f, out_dir / f.name)
    weights = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        for name, tensor in load_file(f).items():
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m is None or int(m.group(1)) < layers:
                weights[name] = tensor
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--type", default="Q4_K_M", help="llama-quantize's type")
    parser.add_argument("--quantize", type=Path, required=True, help="llama-quantize")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        truncate(args.hf_dir, folder, args.layers)
        f16 = model_factory.hf_to_gguf(folder, Path(tmp) / "f16.gguf", "F16")
        subprocess.run([str(args.quantize), str(f16), str(args.out), args.type], check=True)


if __name__ == "__main__":
    main()
