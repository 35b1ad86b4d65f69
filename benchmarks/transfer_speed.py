"""Reading, matching and restoring a ResNet-50-sized checkpoint: transferkit vs plain PyTorch.

For a .pth and a .safetensors copy of timm resnet50's weights (25.6M parameters, ~100 MB), in one
run, alternating: plain `torch.load` / `safetensors.torch.load_file` + `load_state_dict`, against
`transferkit.weights.transfer.transfer(model, path, scope="full")`, which also builds the full
transfer report. Prints median seconds and the ratio (target: at most 1.3x), then how much of the
file each reader copies into anonymous memory (measured in a fresh process, Linux /proc): a
memory-mapped source holds ~0 MB, a copied one the file's size.

    python benchmarks/transfer_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from transferkit.models.family import timm_family
from transferkit.weights.transfer import transfer


def plain(model, path: Path) -> None:
    sd = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    model.load_state_dict(sd)


def ours(model, path: Path) -> None:
    transfer(model, path, scope="full", head_patterns=timm_family(model).head_patterns)


def anon_mb(reader: str, path: Path) -> float:
    """Anonymous (copied, not file-mapped) memory held after reading the file, in a fresh process."""
    code = "\n".join([
        "import torch",
        "from pathlib import Path",
        "from safetensors.torch import load_file",
        "from transferkit.weights.formats import read_weights",
        "def anon():",
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon:'))",
        "base = anon()",
        f"held = {reader}",
        "print((anon() - base) / 1024)",
    ]).replace("PATH", repr(str(path)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


PLAIN_READERS = {"pth": "torch.load(PATH, weights_only=True)", "safetensors": "load_file(PATH)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    source = timm.create_model("resnet50")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    paths = {"pth": tmp / "resnet50.pth", "safetensors": tmp / "resnet50.safetensors"}
    torch.save(state, paths["pth"])
    save_file(state, str(paths["safetensors"]))
    model = timm.create_model("resnet50")
    params = sum(v.numel() for v in state.values())
    print(f"resnet50: {len(state)} tensors, {params / 1e6:.1f}M values, {paths['pth'].stat().st_size / 1e6:.0f} MB; "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    for kind, path in paths.items():
        times = {"plain": [], "transferkit": []}
        for i in range(args.repeats + 1):  # the first round warms the page cache and is not counted
            for name, fn in (("plain", plain), ("transferkit", ours)) if i % 2 else (("transferkit", ours),
                                                                                  ("plain", plain)):
                t0 = time.perf_counter()
                fn(model, path)
                if i:
                    times[name].append(time.perf_counter() - t0)
        p, t = statistics.median(times["plain"]), statistics.median(times["transferkit"])
        mem_p, mem_t = anon_mb(PLAIN_READERS[kind], path), anon_mb("read_weights(PATH)", path)
        print(f"{kind:<12} plain {p:.3f}s  transferkit {t:.3f}s  ratio {t / p:.2f}x (target <= 1.3)  "
              f"copied into memory by the reader: plain {mem_p:.0f} MB, transferkit {mem_t:.0f} MB")
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])


if __name__ == "__main__":
    main()
