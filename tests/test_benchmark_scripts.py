"""The benchmark a GPU machine would run, run here at its CPU size so that it does not rot unseen:
benchmarks/gpu_throughput.py's second docstring command, and the three lines it prints."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_gpu_throughput_runs_at_its_cpu_size():
    cmd = [sys.executable, "benchmarks/gpu_throughput.py", "--device", "cpu", "--model", "test_efficientnet",
           "--image-size", "32", "--batch-size", "8", "--images", "64", "--epochs", "2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    plain = re.fullmatch(r"plain loop +([\d.]+) images/s  \(epochs: ([\d.]+), ([\d.]+)\)", lines[-3])
    ours = re.fullmatch(r"transferkit loop +([\d.]+) images/s  \(epochs: ([\d.]+), ([\d.]+)\)", lines[-2])
    ratio = re.fullmatch(r"ratio transferkit/plain = ([\d.]+)  \(target >= 0\.97\)", lines[-1])
    assert plain and ours and ratio, done.stdout
    assert float(plain[1]) > 0 and float(ours[1]) > 0
    assert abs(float(ratio[1]) - float(ours[1]) / float(plain[1])) < 0.002  # the ratio of the two printed rates
