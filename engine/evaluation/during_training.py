"""Few-shot evaluation while a model trains, without changing the training.

The training arguments call `add_fewshot_flags(group)`; the training loop calls
`fewshot_eval(model, config, iteration, make_generator=...)` after each iteration and logs the
returned dict (empty except every `--fewshot-eval-interval` iterations) to TensorBoard and
`--log-jsonl`, under keys `fewshot/<benchmark>/<k>shot` (score in percent) and
`fewshot/<benchmark>/<k>shot_errors`.

Training stays bit-exact: the hook saves and restores every random state it could touch
(Python, NumPy, torch CPU and every CUDA device), puts the model in eval mode and back into the
mode each module had, runs under torch.no_grad, and generates greedily (no sampling draws).
Questions are sharded over the data-parallel ranks given by `world`; every rank returns the
same dict. Demonstrations are random by default here (seeded per question, so every evaluation
of the run sees the same prompts); `--fewshot-eval-demos rices` uses the live vision tower.

A live model with the Transformer Engine layer spec is generated with through a torch-native
copy of it (engine/inference/live.py; the trainer's `make_generator` wraps that copy), which
holds a second copy of this rank's weights while an evaluation runs.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.evaluation.benchmarks import get_benchmark
from engine.evaluation.runner import SHOTS, EvalSettings, run_benchmark, summarize
from engine.evaluation.sharding import World


def add_fewshot_flags(group) -> None:
    """The training flags (on an argparse parser or argument group)."""
    group.add_argument("--fewshot-eval", nargs="+", default=[], metavar="BENCH:SHOTS",
                       help="benchmarks and shot counts to evaluate during training, e.g. okvqa:0,4 textvqa:4. "
                            "Under the Transformer Engine layer spec the evaluation generates with a torch-native "
                            "copy of the model: a second copy of this rank's weights while it runs")
    group.add_argument("--fewshot-eval-interval", type=int, default=0,
                       help="evaluate every N iterations (0: never)")
    group.add_argument("--fewshot-eval-limit", type=int, default=None,
                       help="first K questions of each benchmark (default: all)")
    group.add_argument("--fewshot-eval-data-root", type=Path, default=None,
                       help="folder with one sub-folder per benchmark (docs/evaluation.md)")
    group.add_argument("--fewshot-eval-demos", choices=("random", "rices"), default="random")
    group.add_argument("--fewshot-eval-template", choices=("seed", "flamingo"), default="seed")


@dataclass(frozen=True)
class FewshotSettings:
    specs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    interval: int = 0
    limit: int | None = None
    data_root: Path | None = None
    demos: str = "random"
    template: str = "seed"

    @classmethod
    def from_config(cls, config) -> "FewshotSettings":
        """From any object with the flags' attributes (argparse namespace or the typed config)."""
        s = cls(specs=parse_specs(getattr(config, "fewshot_eval", None) or []),
                interval=int(getattr(config, "fewshot_eval_interval", 0) or 0),
                limit=getattr(config, "fewshot_eval_limit", None),
                data_root=getattr(config, "fewshot_eval_data_root", None),
                demos=getattr(config, "fewshot_eval_demos", "random"),
                template=getattr(config, "fewshot_eval_template", "seed"))
        if s.specs and s.interval > 0 and s.data_root is None:
            raise ValueError("--fewshot-eval needs --fewshot-eval-data-root")
        if s.interval < 0:
            raise ValueError(f"--fewshot-eval-interval: must be >= 0, got {s.interval}")
        return s

    def due(self, iteration: int) -> bool:
        return bool(self.specs) and self.interval > 0 and iteration > 0 and iteration % self.interval == 0


def parse_specs(specs) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """["okvqa:0,4", "textvqa:4"] -> (("okvqa", (0, 4)), ("textvqa", (4,))); "okvqa" alone is 0-shot."""
    out = []
    for spec in specs:
        name, _, shots = str(spec).partition(":")
        get_benchmark(name, "--fewshot-eval")
        try:
            ks = tuple(int(k) for k in shots.split(",")) if shots else (0,)
        except ValueError:
            raise ValueError(f"--fewshot-eval: {spec!r} is not BENCH:SHOTS with SHOTS like 0,4") from None
        if any(k not in SHOTS for k in ks):
            raise ValueError(f"--fewshot-eval: {spec!r}: shot counts must be among {SHOTS}")
        out.append((name, ks))
    return tuple(out)


@contextmanager
def preserved_training_state(model):
    """Everything an evaluation could change that training depends on, restored on exit."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def fewshot_eval(model, config, iteration: int, *, make_generator: Callable, world: World | None = None,
                 settings: FewshotSettings | None = None) -> dict[str, float]:
    """Scores to log at `iteration` ({} when no evaluation is due). `make_generator(model)` wraps
    the live model in a Generator (engine.inference.EngineGenerator(model, model_config,
    tokenizer)); it is called only when an evaluation is due."""
    s = settings or FewshotSettings.from_config(config)
    if not s.due(iteration):
        return {}
    world = world or World.current()
    logs: dict[str, float] = {}
    with preserved_training_state(model):
        generator = make_generator(model)
        encoder = generator.image_features if s.demos == "rices" else None
        for name, shots in s.specs:
            es = EvalSettings(benchmark=name, shots=shots, template=s.template, demos=s.demos,
                              limit=s.limit, encoder_id=f"live-model@{iteration}")
            run = run_benchmark(generator, s.data_root, es, encoder=encoder, world=world, progress=False)
            for k, r in summarize(run, shots).items():
                logs[f"fewshot/{name}/{k}shot"] = r["score"] if r["score"] is not None else float("nan")
                logs[f"fewshot/{name}/{k}shot_errors"] = float(r["errors"])
    return logs
