"""The shared training loop, folds and notebook writer, on tiny models (CPU, < 20 s)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from kernel_src.models import registry
from kernel_src.training import folds as folds_mod
from kernel_src.training import loop, notebooks


@registry.register_family
class TinyRegressor:
    """A test-only family: y = W x."""

    name = "test_tiny_regressor"
    stage = 0

    @dataclass(frozen=True)
    class Config:
        n_in: int = 4
        n_out: int = 2

    @staticmethod
    def build(config):
        return nn.Linear(config.n_in, config.n_out)


def _problem(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, 1.0, -1.0]])
    return TensorDataset(x, x @ w.T)


def _loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _valid_fn(dataset):
    x, y = dataset.tensors

    def valid(model):
        return {"score": float(nn.functional.mse_loss(model(x), y)), "n": len(x)}
    return valid


def _fit(tmp_path, epochs, resume=True, lr=0.05, stop_after=None):
    torch.manual_seed(0)
    cfg = TinyRegressor.Config()
    model = TinyRegressor.build(cfg)
    data, valid = _problem(), _problem(32, seed=1)
    loader = loop.make_loader(data, batch_size=8, seed=0)
    tc = loop.TrainConfig(epochs=epochs, lr=lr, ema_decay=0.9, resume=resume, warmup_frac=0.1)
    valid_fn, calls = _valid_fn(valid), []

    def interrupted(m):
        calls.append(1)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return valid_fn(m)
    return model, loop.fit(model, loader, interrupted, tc, _loss, tmp_path,
                           family=TinyRegressor.name, model_config=cfg)


def test_fit_lowers_validation_error_and_saves_best(tmp_path):
    torch.manual_seed(0)
    with torch.no_grad():
        untrained = _valid_fn(_problem(32, seed=1))(TinyRegressor.build(TinyRegressor.Config()))
    model, result = _fit(tmp_path, epochs=6)
    assert result["best_score"] < 0.25 * untrained["score"]
    assert result["epochs_run"] == 6 and len(result["history"]) == 6
    assert result["best_score"] == min(h["score"] for h in result["history"])
    rebuilt, cfg, payload = registry.load_checkpoint(tmp_path / "best.pt")
    assert payload["family"] == TinyRegressor.name and cfg == TinyRegressor.Config()
    assert payload["metrics"]["epoch"] == result["best_epoch"]
    # the saved weights are the EMA weights that achieved the best score
    with torch.no_grad():
        again = _valid_fn(_problem(32, seed=1))(rebuilt)["score"]
    assert again == pytest.approx(result["best_score"], rel=1e-5)
    assert (tmp_path / "last.pt").is_file()


def test_resume_continues_from_last_epoch(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # killed during the 4th validation
        _fit(tmp_path, epochs=5, stop_after=3)
    _, resumed = _fit(tmp_path, epochs=5)
    assert resumed["epochs_run"] == 2
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3, 4]
    # an uninterrupted run gives the same history (same batches, schedule, EMA)
    _, straight = _fit(tmp_path / "fresh", epochs=5)
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
    assert straight["best_score"] == pytest.approx(resumed["best_score"], rel=1e-5)


def test_resume_state_of_other_settings_is_not_resumed(tmp_path, capsys):
    _fit(tmp_path, epochs=3)
    _, again = _fit(tmp_path, epochs=3)  # same settings: nothing left to run
    assert again["epochs_run"] == 0
    _, other = _fit(tmp_path, epochs=3, lr=0.02)  # another schedule: trained afresh
    assert other["epochs_run"] == 3 and [h["epoch"] for h in other["history"]] == [0, 1, 2]
    out = capsys.readouterr().out
    assert "other settings (lr)" in out and "training from scratch" in out


def test_cosine_with_warmup_shape():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = loop.cosine_with_warmup(opt, total_steps=100, warmup_frac=0.1, min_lr_ratio=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lrs[-1] < 0.02 and lrs[55] == pytest.approx(0.01 + 0.99 * 0.5, abs=0.02)


def test_ema_tracks_with_warmup_then_decay():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = loop.EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: decay min(0.99, 2/11)
    assert float(ema.module.weight) == pytest.approx(1 - 2 / 11)
    for _ in range(2000):
        ema.update(model)
    assert float(ema.module.weight) == pytest.approx(1.0, abs=1e-6)


def test_nonfinite_loss_is_an_error(tmp_path):
    model = nn.Linear(4, 2)
    loader = loop.make_loader(_problem(), batch_size=8)
    with pytest.raises(FloatingPointError, match="epoch 0 step 0"):
        loop.fit(model, loader, _valid_fn(_problem()), loop.TrainConfig(epochs=1),
                 lambda m, b: torch.tensor(float("nan")), tmp_path)


def _ddp_worker(rank, world, init_file, out_dir, report_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        if rank != 0:  # only rank 0 may write
            def refuse(*a, **k):
                raise AssertionError("rank 1 wrote a checkpoint")
            loop._save_best = loop._save_last = refuse
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's
        cfg = TinyRegressor.Config()
        model = TinyRegressor.build(cfg)
        data = _problem()
        seen = []

        def loss_fn(m, batch):
            seen.extend(batch[0][:, 0].tolist())
            return _loss(m, batch)

        loader = loop.make_loader(data, batch_size=8, seed=0)
        result = loop.fit(model, loader, _valid_fn(_problem(32, seed=1)),
                          loop.TrainConfig(epochs=2, lr=0.05), loss_fn, out_dir,
                          family=TinyRegressor.name, model_config=cfg)
        weights = [float(v) for v in model.weight.detach().flatten()]
        (report_dir / f"rank{rank}.json").write_text(json.dumps(
            {"seen": seen, "weights": weights, "best": result["best_score"]}))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    out, rep = tmp_path / "out", tmp_path / "rep"
    rep.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out, rep), nprocs=2, join=True)
    r0, r1 = (json.loads((rep / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weights"] == pytest.approx(r1["weights"], abs=1e-6)  # synchronised
    assert r0["best"] == r1["best"] and math.isfinite(r0["best"])  # broadcast result
    n = len(_problem())
    assert len(r0["seen"]) == len(r1["seen"]) == 2 * n // 2  # each rank: half, 2 epochs
    first_epoch = set(r0["seen"][: n // 2]) | set(r1["seen"][: n // 2])
    assert len(first_epoch) == n  # the two shards cover the data set
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()


def test_folds_are_seeded_balanced_and_reused(tmp_path):
    ids = list(range(100, 137))
    a = folds_mod.make_folds(ids, 5, seed=3)
    assert a.equals(folds_mod.make_folds(list(reversed(ids)), 5, seed=3))
    assert not a["fold"].equals(folds_mod.make_folds(ids, 5, seed=4)["fold"])
    sizes = a["fold"].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 1
    path = tmp_path / "folds.csv"
    first = folds_mod.load_or_make_folds(path, ids, 5, seed=3)
    again = folds_mod.load_or_make_folds(path, ids[:10], 5, seed=99)  # reused, not remade
    assert first.equals(again) and first.equals(a)
    train, valid = folds_mod.split(first, 2)
    assert set(train).isdisjoint(valid) and len(train) + len(valid) == len(ids)
    with pytest.raises(ValueError, match="have no fold"):
        folds_mod.load_or_make_folds(path, ids + [999], 5)
    with pytest.raises(ValueError, match="3 asked"):
        folds_mod.load_or_make_folds(path, ids, 3)
    pd.DataFrame({"study_id": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv: missing column"):
        folds_mod.load_or_make_folds(tmp_path / "bad.csv", [1], 5)


def test_notebook_writer_has_one_parameters_cell_and_a_call(tmp_path):
    spec = notebooks.NotebookSpec(
        filename="nb.ipynb", title="T", description="d", module="kernel_src.training.folds",
        function="make_folds", parameters={"study_ids": [1, 2], "n_folds": 2},
        comments={"n_folds": "how many"})
    path = notebooks.write_notebook(spec, tmp_path)
    nb = __import__("nbformat").read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "n_folds = 2  # how many" in tagged[0].source
    assert "folds.make_folds(dict(" in nb.cells[-1].source
    assert "n_folds=n_folds" in nb.cells[-1].source
    assert path.read_text() == notebooks.write_notebook(spec, tmp_path).read_text()
