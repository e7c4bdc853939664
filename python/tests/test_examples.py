"""examples/python run as a user runs them (a fresh process each), with what each promises to print."""
import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python")


def run(name, timeout=300):
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], capture_output=True, text=True,
                       timeout=timeout, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert p.returncode == 0, "%s failed (rc %d):\n%s\n%s" % (name, p.returncode, p.stdout, p.stderr)
    return p.stdout


def test_numpy_classes():
    out = run("numpy_classes.py")
    assert "freeze: running_mean unchanged: True" in out
    assert "save/load round trip: True" in out


def test_cnn_digits():
    pytest.importorskip("torch")
    out = run("cnn_digits.py")
    acc = [float(a) for a in re.findall(r"^bnorm\s+epoch \d+ .*test accuracy ([0-9.]+)", out, re.M)]
    assert acc and max(acc) > 0.8, out  # the converted model learns the digits
    assert re.search(r"training time: torch [0-9.]+ s, bnorm \(convert\) [0-9.]+ s", out), out


def test_sync_gloo():
    pytest.importorskip("torch")
    out = run("sync_gloo.py")
    # not anchored to line starts: the example writes each line in one call, but stay robust to interleaving
    ranks = re.findall(r"rank \d+: local batch \d+, running_mean (\[[^\]]*\])", out)
    one = re.findall(r"one process on all \d+: running_mean (\[[^\]]*\])", out)
    assert len(ranks) == 2 and len(one) == 1, out
    assert ranks[0] == ranks[1] == one[0], out  # printed to 4 decimals
