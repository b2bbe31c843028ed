"""upcycle.runtime.training, the library under examples/train.py and upcycle-export-run: the run
folder's format, the schedule, the batch order, the test hook (tests/test_train_example.py runs the
whole loop end to end through the example's command line)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from upcycle.runtime.training import data, run_dir, schedule, trainer


def _info(**over):
    info = dict(args={"steps": 8}, source={"kind": "tiny", "seed": 0}, spec={"experts": {}},
                dense_config={"model_type": "llama"}, tokenizer="bytes", params=123, relax_routing_step=None)
    info.update(over)
    return info


def test_run_json_round_trip_keeps_the_documented_key_order(tmp_path):
    path = run_dir.write_run_info(tmp_path, **_info())
    assert path == tmp_path / "run.json"
    assert tuple(json.loads(path.read_text())) == run_dir.RUN_KEYS
    assert run_dir.read_run_info(tmp_path) == _info()
    # as examples/train.py wrote it before the move: json.dumps(..., indent=2) of the same dict
    assert path.read_text() == json.dumps(_info(), indent=2)


@pytest.mark.parametrize("bad, needle", [
    ({"source": []}, "`source` must be an object"),
    ({"source": {"kind": "upcycled"}}, "with a `path` string"),
    ({"dense_config": None}, "needs 'dense_config'"),
    ({"spec": "e8g8t8"}, "needs 'dense_config'"),
    ({"relax_routing_step": 1.5}, "relax_routing_step must be an integer"),
    ({"relax_routing_step": True}, "relax_routing_step must be an integer"),
])
def test_run_json_missing_what_a_rebuild_reads_is_one_line(tmp_path, bad, needle):
    run_dir.write_run_info(tmp_path, **_info(**bad))
    with pytest.raises(run_dir.RunInfoError, match=needle) as exc:
        run_dir.read_run_info(tmp_path)
    assert str(tmp_path / "run.json") in str(exc.value) and "\n" not in str(exc.value)


def test_a_folder_without_run_json_is_not_a_run_folder(tmp_path):
    with pytest.raises(run_dir.NoRunInfo, match="no run.json; not a run folder written by examples/train.py$"):
        run_dir.read_run_info(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2")
    with pytest.raises(run_dir.RunInfoError, match="cannot read the run.json"):
        run_dir.read_run_info(tmp_path)


def test_export_run_reports_run_json_problems_as_the_compiler_errors(tmp_path):
    from upcycle.compiler.errors import ModelError, UpcycleError
    from upcycle.compiler.export_run import read_run_info

    with pytest.raises(UpcycleError, match="no run.json"):
        read_run_info(tmp_path)
    run_dir.write_run_info(tmp_path, **_info(relax_routing_step="x"))
    with pytest.raises(ModelError, match="relax_routing_step"):
        read_run_info(tmp_path)


def test_checkpoint_names():
    assert run_dir.checkpoint_dir("r", 40).as_posix() == "r/checkpoints/step-000040"
    assert run_dir.checkpoint_step(run_dir.checkpoint_dir("r", 40)) == 40


def _old_lr_lambda(args):
    """examples/train.py's schedule before the move, verbatim."""
    def f(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return (args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))) / args.lr
    return f


def test_schedule_is_the_examples_schedule_bit_for_bit():
    args = SimpleNamespace(lr=3e-4, min_lr=3e-5, warmup=15, steps=300)
    new, old = schedule.lr_lambda(args), _old_lr_lambda(args)
    assert [new(s) for s in range(320)] == [old(s) for s in range(320)]
    assert new(0) == 1 / 15 and new(14) == 1.0 and new(299) == pytest.approx(0.1, rel=1e-3)


def test_weight_decay_on_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, plain = schedule.param_groups(model, 0.1)
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert [p.dim() for p in plain["params"]] == [1, 1, 1] and plain["weight_decay"] == 0.0
    opt = schedule.adamw([decay, plain], 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_batches_of_all_ranks_are_the_one_process_batch():
    train = torch.arange(10 * 3).view(10, 3)
    for step in range(7):  # across an epoch boundary (10 sequences, 4 per step)
        one = torch.cat(data.batch_for(step, train, batch=4, accum=2, seed=3))
        ranks = [torch.cat(data.batch_for(step, train, batch=4, accum=1, seed=3, rank=r, world=2)) for r in range(2)]
        assert torch.equal(one, torch.cat(ranks))
        assert [m.shape[0] for m in data.batch_for(step, train, batch=4, accum=2, seed=3)] == [2, 2]
    firsts = torch.cat([data.batch_for(s, train, batch=5, accum=1, seed=0)[0] for s in range(2)])
    assert sorted(firsts[:, 0].tolist()) == list(range(0, 30, 3))  # one epoch: every sequence once


def test_pack_and_byte_tokens():
    ids = data.byte_tokens("abcdefg")
    assert ids.tolist() == list(b"abcdefg")
    assert data.pack(ids, 3).tolist() == [list(b"abc"), list(b"def")]


def test_kill_hook_lives_in_the_library(monkeypatch):
    monkeypatch.delenv(trainer.KILL_AT_STEP_ENV, raising=False)
    assert trainer.kill_step() == -1
    monkeypatch.setenv("UPCYCLE_TRAIN_KILL_AT_STEP", "6")
    assert trainer.kill_step() == 6
    assert trainer.kill_step(2) == 2


def test_relax_step():
    assert trainer.relax_step(SimpleNamespace(relax_routing_at=1.0, steps=100)) is None
    assert trainer.relax_step(SimpleNamespace(relax_routing_at=0.9, steps=100)) == 90


def test_missing_text_is_an_exception_and_scripts_turn_it_into_one_line(monkeypatch):
    """A library must not exit its caller's process: no bible-kjv raises TextUnavailable (naming
    the package to install); a script's `sys.exit(exit_code(main))` makes it the one line."""
    def no_bible(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "bible")

    monkeypatch.setattr(data.subprocess, "run", no_bible)
    with pytest.raises(data.TextUnavailable, match="apt-get install bible-kjv"):
        data.kjv_split()
    msg = data.exit_code(lambda: data.kjv_split() and 0)
    assert isinstance(msg, str) and msg.startswith("error: need Debian's bible-kjv") and "\n" not in msg
    assert data.exit_code(lambda: 3) == 3
