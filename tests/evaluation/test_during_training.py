"""The during-training hook: flags, schedule, scores, and training state left as it was."""

import argparse
import random

import numpy as np
import pytest
import torch

from _scripted import ScriptedGenerator
from engine.evaluation.during_training import FewshotSettings, add_fewshot_flags, fewshot_eval, parse_specs


def _config(data_root, *extra):
    p = argparse.ArgumentParser()
    add_fewshot_flags(p.add_argument_group("few-shot evaluation"))
    return p.parse_args(["--fewshot-eval", "okvqa:0,1", "textvqa", "--fewshot-eval-interval", "5",
                         "--fewshot-eval-limit", "2", "--fewshot-eval-data-root", str(data_root), *extra])


def test_flags_and_specs(data_root):
    s = FewshotSettings.from_config(_config(data_root))
    assert s.specs == (("okvqa", (0, 1)), ("textvqa", (0,))) and s.limit == 2 and s.interval == 5
    assert [s.due(i) for i in (0, 4, 5, 10)] == [False, False, True, True]
    with pytest.raises(ValueError, match="--fewshot-eval: unknown benchmark 'vqa'"):
        parse_specs(["vqa:0"])
    with pytest.raises(ValueError, match="shot counts must be among"):
        parse_specs(["okvqa:3"])
    with pytest.raises(ValueError, match="needs --fewshot-eval-data-root"):
        FewshotSettings.from_config(argparse.Namespace(fewshot_eval=["okvqa:0"], fewshot_eval_interval=2))


def test_hook_scores_and_restores_training_state(data_root, inference_api):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model.train()
    model[1].eval()  # a module the training keeps in eval mode stays so
    seen = []

    def make_generator(m):
        seen.append((m.training, torch.is_grad_enabled()))
        torch.manual_seed(123), random.seed(5), np.random.seed(7)  # an evaluation that draws random numbers
        return ScriptedGenerator({"200": "cat", "201": "dog"}, default="stop")

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    cfg = _config(data_root)
    assert fewshot_eval(model, cfg, 4, make_generator=make_generator) == {} and not seen
    logs = fewshot_eval(model, cfg, 5, make_generator=make_generator)
    assert seen == [(False, False)]
    assert logs["fewshot/okvqa/0shot"] == pytest.approx(80.0) and logs["fewshot/okvqa/0shot_errors"] == 0.0
    assert set(logs) == {"fewshot/okvqa/0shot", "fewshot/okvqa/0shot_errors", "fewshot/okvqa/1shot",
                         "fewshot/okvqa/1shot_errors", "fewshot/textvqa/0shot", "fewshot/textvqa/0shot_errors"}
    assert logs["fewshot/textvqa/0shot"] == pytest.approx(100.0)  # "stop": 6 of 10 annotators (>= 4)
    assert (model.training, model[0].training, model[1].training, model[2].training) == (True, True, False, True)
    assert torch.is_grad_enabled()
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
