"""One benchmark at several shot counts on a Generator: read, check pictures, choose
demonstrations, build prompts, generate, score, gather.

Questions are sharded over the ranks (sharding.py) and every record is gathered back in the
benchmark's order, so the outputs do not depend on the number of GPUs. A question whose picture
is missing or unreadable, or that the generator refuses (Result.error: a prompt too long, ...),
becomes an error record: it is listed and counted, never scored and never silently dropped. A
demonstration candidate with a broken picture is listed once (shots = null) and left out of the
pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from engine.evaluation.benchmarks import (Benchmark, get_benchmark, read_demo_pool, read_split,
                                          score_output)
from engine.evaluation.demos import demos_for, random_selection, rices_selection
from engine.evaluation.images import describe, image_problem
from engine.evaluation.items import Item
from engine.evaluation.rices import Encoder, features
from engine.evaluation.sharding import World
from engine.evaluation.templates import build_prompt, stop_strings

SHOTS = (0, 1, 2, 4, 8)


@dataclass(frozen=True)
class EvalSettings:
    benchmark: str
    shots: tuple[int, ...] = (0,)
    template: str = "seed"
    demos: str = "random"                  # random | rices
    seed: int = 0
    limit: int | None = None
    batch_size: int = 64                   # requests handed to the generator at a time
    cache_dir: Path | None = None          # RICES feature cache
    encoder_id: str = "model"              # names the RICES encoder in the cache key


@dataclass
class BenchmarkRun:
    benchmark: str
    predictions: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def check_settings(s: EvalSettings) -> None:
    get_benchmark(s.benchmark)
    bad = [k for k in s.shots if k not in SHOTS]
    if bad or not s.shots:
        raise ValueError(f"--shots: {bad or 'none given'}; allowed shot counts are {', '.join(map(str, SHOTS))}")
    if s.demos not in ("random", "rices"):
        raise ValueError(f"--demos: {s.demos!r} is not random or rices")
    if s.limit is not None and s.limit < 1:
        raise ValueError(f"--limit: must be at least 1, got {s.limit}")


def _error(bench: str, shots, item: Item, reason: str, role: str = "question") -> dict:
    return {"benchmark": bench, "shots": shots, "id": item.id, "role": role,
            "image": describe(item.image), "reason": reason}


def _usable(items: Sequence[Item], world: World) -> list[str | None]:
    """Per item, None or why its picture cannot be used (checked shard by shard)."""
    return world.merge([image_problem(it.image) for it in world.shard(list(items))])


def _selections(bench: Benchmark, s: EvalSettings, queries: list[Item], pool: list[Item],
                encoder: Encoder | None, world: World) -> list[list[int]]:
    k = max(s.shots)
    if k == 0:
        return [[] for _ in queries]
    same = bench.directory == get_benchmark(bench.demo_benchmark).directory and bench.split == bench.demo_split
    if s.demos == "random":
        return [random_selection(q, pool, k, seed=s.seed, benchmark=bench.name, same_source=same)
                for q in queries]
    if encoder is None:
        raise ValueError("--demos rices needs image features: a generator with image_features or --rices-encoder")
    qf = features(queries, encoder, benchmark=bench.name, split=bench.split, encoder_id=s.encoder_id,
                  cache_dir=s.cache_dir, world=world)
    pf = features(pool, encoder, benchmark=bench.demo_benchmark, split=bench.demo_split,
                  encoder_id=s.encoder_id, cache_dir=s.cache_dir, world=world)
    return rices_selection(qf, pf, queries, pool, k, same_source=same)


def prepare(s: EvalSettings, data_root: Path, encoder: Encoder | None, world: World):
    """(benchmark, usable questions, their demo selections, the demo pool, (question, reason) of
    the unusable questions, error records of the unusable demo candidates)."""
    bench = get_benchmark(s.benchmark)
    items = read_split(data_root, bench)[: s.limit]
    problems = _usable(items, world)
    errors = [(it, why) for it, why in zip(items, problems) if why]
    good = [it for it, why in zip(items, problems) if not why]
    pool, pool_errors = [], []
    if max(s.shots) > 0:
        candidates = read_demo_pool(data_root, bench)
        pool_problems = _usable(candidates, world)
        pool = [d for d, why in zip(candidates, pool_problems) if not why]
        pool_errors = [_error(bench.name, None, d, why, "demo") for d, why in zip(candidates, pool_problems) if why]
    selections = _selections(bench, s, good, pool, encoder, world)
    return bench, good, selections, pool, errors, pool_errors


def answer(generator, bench: Benchmark, s: EvalSettings, shots: int, mine, pool, progress=lambda n: None) -> list[dict]:
    """One record per (question, selection) of `mine` at `shots` shots: build the prompts, generate
    (`s.batch_size` requests at a time), score; a refused request becomes {"error": record}."""
    from engine.inference import Request, SamplingParams

    params = SamplingParams(max_new_tokens=bench.max_new_tokens, temperature=0.0,
                            stop=stop_strings(s.template, bench.task), seed=s.seed)
    records = []
    for start in range(0, len(mine), s.batch_size):
        batch = mine[start:start + s.batch_size]
        requests = []
        for item, sel in batch:
            demos = demos_for(sel, pool, shots)
            prompt = build_prompt(s.template, bench.task, demos, item)
            requests.append((Request(id=item.id, prompt=prompt, images=tuple(d.image for d in demos) + (item.image,)),
                             [d.id for d in demos]))
        results = generator.generate([r for r, _ in requests], params)
        for (item, _), (_, demo_ids), res in zip(batch, requests, results):
            records.append(_record(bench, shots, item, demo_ids, res))
        progress(len(batch))
    return records


def _record(bench: Benchmark, shots: int, item: Item, demo_ids: list[str], res) -> dict:
    if res.error:
        return {"error": _error(bench.name, shots, item, f"generation: {res.error}")}
    parsed, score = score_output(bench, item, res.text)
    return {"benchmark": bench.name, "shots": shots, "id": item.id, "demo_ids": demo_ids,
            "prompt_length": res.prompt_length, "output": res.text, "parsed": parsed, "score": score,
            "finish_reason": res.finish_reason}


def run_benchmark(generator, data_root: Path, s: EvalSettings, *, encoder: Encoder | None = None,
                  world: World = World(), progress: bool = True) -> BenchmarkRun:
    """Every shot count of `s` on one benchmark; identical on every rank when it returns."""
    check_settings(s)
    bench, good, selections, pool, bad, pool_errors = prepare(s, data_root, encoder, world)
    run = BenchmarkRun(bench.name, errors=list(pool_errors))
    mine = world.shard(list(zip(good, selections)))
    bar = _progress(len(mine) * len(s.shots), f"{bench.name} ({world.size} rank(s))", progress and world.rank == 0)
    for shots in s.shots:
        records = world.merge(answer(generator, bench, s, shots, mine, pool, bar.update))
        run.errors += [_error(bench.name, shots, it, why) for it, why in bad]
        run.errors += [r["error"] for r in records if "error" in r]
        run.predictions += [r for r in records if "error" not in r]
    bar.close()
    return run


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, mininterval=2.0)


def summarize(run: BenchmarkRun, shots: Sequence[int]) -> dict:
    """{shots: {score (percent), n, errors}} of one benchmark run."""
    out = {}
    for k in shots:
        scores = [p["score"] for p in run.predictions if p["shots"] == k]
        errors = sum(1 for e in run.errors if e["shots"] == k)
        out[str(k)] = {"score": 100.0 * sum(scores) / len(scores) if scores else None,
                       "n": len(scores), "errors": errors}
    return out
