"""Shared settings of the fault and bad-input suite.

Property-based tests run under a hypothesis profile chosen by ``HYPOTHESIS_PROFILE``:
- ``ci`` (default): derandomized (the same examples on every run, so CI is reproducible and a
  failure seen once is seen again), no deadline (a 2-core CI machine is slow and noisy), and the
  example counts written beside each test;
- ``explore``: random seeds and ``RELIABILITY_EXAMPLES`` times as many examples, for hunting new
  failures locally: ``HYPOTHESIS_PROFILE=explore RELIABILITY_EXAMPLES=20 pytest tests/reliability``.
A failure prints the example and a ``@reproduce_failure`` blob that replays it.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("explore", **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------------------- training runs

import importlib.util  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def training_data(tmp_path_factory) -> str:
    """The training tests' dataset (tests/training/conftest.py: real photos, real text)."""
    from helpers import REPO, tokenizer_path

    spec = importlib.util.spec_from_file_location("training_data", REPO / "tests" / "training" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_dataset(tmp_path_factory.mktemp("training_data") / "sample", tokenizer_path())


@pytest.fixture(scope="session")
def training_reference(training_data, tmp_path_factory) -> dict:
    """An uninterrupted run of faultlib.training_flags: {iteration: logged record}."""
    from faultlib import TRAIN_ITERS, run_training, training_flags
    from helpers import read_jsonl

    root = tmp_path_factory.mktemp("training_reference")
    run_training(training_flags(training_data, root, "--log-jsonl", root / "log.jsonl"), root / "out.log")
    records = read_jsonl(root / "log.jsonl", "train")
    assert [r["iteration"] for r in records] == list(range(1, TRAIN_ITERS + 1))
    return {"root": root, "records": {r["iteration"]: r for r in records}}
