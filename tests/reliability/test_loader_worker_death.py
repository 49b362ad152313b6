"""A DataLoader worker that dies or meets a corrupt image: a clear error naming the sample, no hang.

Each case runs the loader in a fresh process under a time limit (a hang fails the test instead
of stalling CI), on a real packed dataset (real tokenizer, real photos).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data.packing import PackingConfig
from engine.data.tokenizer import SentencePieceTokenizer
from helpers import tokenizer_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "data"))
from test_dataset import random_documents, write_corpus  # noqa: E402

CONFIG = PackingConfig(seq_length=2048, seed=11)

# Iterates the loader in a fresh process; prints what ended the iteration as one JSON line.
_DRIVER = """
import json, sys, time
from engine.data.dataset import PackedDataset
from engine.data.loader import build_loader
from engine.data.packing import PackingConfig
from faultlib import DyingDataset

prefix, how, k, context, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
ds = PackedDataset(prefix, PackingConfig(seq_length=2048, seed=11), split_weights="1,0,0", cache=False)
if how != "corrupt":
    ds = DyingDataset(ds, k, how)
loader = build_loader(ds, micro_batch_size=1, num_workers=2, prefetch_factor=2, timeout=timeout,
                      multiprocessing_context=context)
start, batches = time.monotonic(), 0
try:
    for _ in loader:
        batches += 1
    result = {"error": None}
except Exception as e:
    result = {"error": type(e).__name__, "message": str(e)}
result.update(batches=batches, seconds=time.monotonic() - start)
print(json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tok = SentencePieceTokenizer(tokenizer_path())
    prefix = tmp_path_factory.mktemp("death") / "docs"
    write_corpus(prefix, tok, random_documents(np.random.default_rng(7), 16))
    return prefix


def _drive(prefix, how: str, k: int, context: str, timeout: float = 0) -> dict:
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'reliability'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-c", _DRIVER, str(prefix), how, str(k), context, str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO,
                          env=env)  # a hang raises TimeoutExpired
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit code {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(lines[-1])


# Fork workers run under training's default --loader-timeout: a death is still named at once,
# not when the timeout runs out; spawn workers without a timeout (torch's own wait).
@pytest.mark.parametrize("context, timeout", [("fork", 300), ("spawn", 0)])
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_dead_worker_is_named_not_a_hang(corpus, how, context, timeout):
    result = _drive(corpus, how, 5, context, timeout)
    assert result["error"] == "WorkerDiedError", result
    assert "died while building sample 5 of DyingDataset(PackedDataset(" in result["message"], result
    assert str(corpus) in result["message"]
    assert result["seconds"] < 60
    assert result["batches"] <= 5  # it stops there, it does not skip the sample and go on


def test_corrupt_image_in_a_worker_is_named_not_a_hang(corpus, tmp_path):
    from engine.data.dataset import PackedDataset

    prefix = tmp_path / "docs"
    for src in Path(corpus).parent.glob("docs.*"):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    ds = PackedDataset(prefix, CONFIG, split_weights="1,0,0", cache=False)
    victim = len(ds) - 1  # the last sample, so several batches come before it
    image = next(i for d, _, _ in ds.index.segments_of(victim).tolist() for i in ds.reader.doc_images(d))
    with open(f"{prefix}.images.bin", "r+b") as f:
        f.seek(int(ds.reader.image_byte_offsets[image]) + 700)
        f.write(b"\x00" * 32)
    result = _drive(prefix, "corrupt", -1, "fork")
    assert result["error"] == "SampleError", result
    assert f"image {image} fails its checksum" in result["message"]
    assert any(f"cannot build sample {k} " in result["message"]
               for k in range(len(ds)) if image in [i for d, _, _ in ds.index.segments_of(k).tolist()
                                                    for i in ds.reader.doc_images(d)])
    assert result["batches"] < len(ds)
