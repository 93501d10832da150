"""--sweep cannot lose: the defaults are in every grid and are replaced only by a choice that beats them beyond
noise on the held-out rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.stage2 import choice
from pipeline.stage2.heads import HeadConfig, build_head
from tests.conftest import separable_features


def _held(n: int) -> np.ndarray:
    return np.arange(0, n, 5)  # every fifth row: 20%


def test_the_heads_own_settings_join_the_grid() -> None:
    head = build_head(HeadConfig(head="linear", lr=7e-4), num_classes=3, feature_dim=4)
    grid, own = choice.with_own_point(head, [{"lr": 1e-3, "weight_decay": 0.0}])
    assert own == 1 and grid[own] == {"lr": 7e-4, "weight_decay": 0.0}
    head = build_head(HeadConfig(head="linear"), num_classes=3, feature_dim=4)
    grid, own = choice.with_own_point(head, type(head).sweep_grid(head.cfg))
    assert grid[own] == {"lr": head.cfg.lr, "weight_decay": head.cfg.weight_decay, "epochs": head.cfg.epochs}
    assert len(grid) == 15 * head.cfg.epochs  # 5 lr x 3 weight decays x every epoch count


def test_a_choice_within_noise_keeps_the_defaults_and_says_so() -> None:
    X, y = separable_features(n=600, classes=3, spread=1.0)
    cfg = HeadConfig(head="linear", epochs=5, device="cpu")
    head = build_head(cfg, num_classes=3, feature_dim=32)
    grid = [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 1e-7}]  # the same head, nearly
    # the second point "scored" higher by a hair (as the highest of many noisy scores does)
    index, record = choice.guard(head, X, y, held=_held(600), grid=grid, scores=[0.80, 0.81], own=0)
    assert index == 0 and record["kept_defaults"] and "not beyond noise" in record["note"]
    assert record["p_value_vs_defaults"] > 0.05


def test_on_data_where_a_high_rate_ends_badly_the_sweep_keeps_a_head_as_good_as_the_defaults() -> None:
    """A learning rate so high the last epoch bounces (noisy labels): whatever the held-out scores, the head the
    sweep hands back is at least as good as the defaults on the held-out rows, and a clearly better one is taken."""
    rng = np.random.default_rng(0)
    X, y = separable_features(n=1500, classes=4, spread=0.6)
    y = np.where(rng.random(1500) < 0.2, rng.integers(0, 4, 1500), y)  # 20% label noise
    cfg = HeadConfig(head="linear", epochs=6, device="cpu")
    head = build_head(cfg, num_classes=4, feature_dim=32)
    held = _held(1500)
    fit = np.setdiff1d(np.arange(1500), held)
    grid = [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 3.0, "weight_decay": 0.0}, {"lr": 1e-6, "weight_decay": 0.0}]
    accuracy = lambda t, p: float((p.argmax(1) == t).mean())  # noqa: E731
    scores = head.sweep_scores(X[fit], y[fit], (X[held], y[held]), grid=grid, score=accuracy)
    # even were the bouncing rate's held-out score the highest, it must beat the defaults beyond noise
    for claimed in (scores, [scores[0], max(scores) + 0.01, scores[2]]):
        index, record = choice.guard(head, X, y, held=held, grid=grid, scores=claimed, own=0)
        got = choice.held_out_predictions(head, grid[index], X, y, held).argmax(1)
        defaults = choice.held_out_predictions(head, grid[0], X, y, held).argmax(1)
        assert (got == y[held]).mean() >= (defaults == y[held]).mean()
    # the defaults against a rate too small to learn: the defaults win; seen from the tiny rate, they beat it
    tiny = build_head(HeadConfig(head="linear", epochs=6, lr=1e-6, device="cpu"), num_classes=4, feature_dim=32)
    index, record = choice.guard(tiny, X, y, held=held, grid=grid, scores=[0.9, 0.1, 0.3], own=2)
    assert index == 0 and not record["kept_defaults"] and record["p_value_vs_defaults"] < 0.05


def test_standardize_hint_when_linear_trails_logreg_on_raw_features() -> None:
    from pipeline.stage2.comparing import standardize_hint

    rows = [{"head": "linear", "val_accuracy": 0.62}, {"head": "logreg", "val_accuracy": 0.85},
            {"head": "mlp", "val_accuracy": 0.83}]  # fmt: skip
    hint = standardize_hint(rows, base=HeadConfig(head="linear"))
    assert hint and "linear 0.620" in hint and "mlp" not in hint and "--standardize" in hint
    assert standardize_hint(rows, base=HeadConfig(head="linear", standardize=True)) is None
    rows[0]["val_accuracy"] = 0.82
    assert standardize_hint(rows, base=HeadConfig(head="linear")) is None


def test_overfitting_advice_after_a_sweep_knows_what_was_swept() -> None:
    from types import SimpleNamespace

    from pipeline.stage2.evaluate import overfitting_warning

    m = SimpleNamespace(overfitting=True, head="logreg", overfit_words=lambda: "train exceeds val",
                        sweep={"chosen": {"C": 0.5}, "kept_defaults": False})  # fmt: skip
    line = overfitting_warning(m)
    assert "already chose" in line and "C 0.5" in line and "smaller --C" not in line
    m.sweep = None
    assert "--sweep to choose" in overfitting_warning(m)


def test_a_sweep_where_the_last_epoch_drops_keeps_a_head_at_least_as_good_as_the_defaults(monkeypatch) -> None:
    """The issue's failure: the sweep's rate ended on an epoch that dropped, and its last epoch was kept. Now every
    epoch count is a grid point, so the sweep can stop before the drop, and what it hands back scores at least as
    well as the defaults on the held-out rows."""
    from pipeline.stage2.heads.fitting import with_epochs
    from pipeline.stage2.heads.linear import LinearHead
    from pipeline.stage2.protocol import HELD_OUT_FRACTION, sweep
    from pipeline.stage2.tasks import TASKS

    rng = np.random.default_rng(0)
    X, y = separable_features(n=1500, classes=4, spread=2.5)
    y = np.where(rng.random(1500) < 0.2, rng.integers(0, 4, 1500), y)  # 20% label noise: a high rate bounces
    cfg = HeadConfig(head="linear", epochs=6, lr=1e-2, sweep=True, device="cpu")
    grid = with_epochs([{"lr": 1e-2, "weight_decay": 0.0}, {"lr": 0.3, "weight_decay": 0.0}], cfg.epochs)
    monkeypatch.setattr(LinearHead, "sweep_grid", classmethod(lambda cls, cfg: grid))
    head = build_head(cfg, num_classes=4, feature_dim=32)
    _, record = sweep(head, X, y, task=TASKS["classify"])
    high = record["held_out_accuracy"][cfg.epochs :]  # the lr 0.3 run, epoch by epoch
    assert high[-1] < max(high)  # on this data the last epoch of the high rate is not its best
    fit, held, _ = TASKS["classify"].holdout(y, fraction=HELD_OUT_FRACTION, seed=cfg.seed)
    chosen = choice.held_out_predictions(head, record["chosen"], X, y, held).argmax(1)
    defaults = choice.held_out_predictions(head, record["defaults"], X, y, held).argmax(1)
    assert record["defaults"] == {"lr": 1e-2, "weight_decay": 0.0, "epochs": 6}
    assert (chosen == y[held]).mean() >= (defaults == y[held]).mean()
    # the score recorded for the chosen point is that of the head its settings train (an E-epoch run is the first
    # E epochs of a longer one): what was chosen is what is refitted
    assert record["chosen_score"] == (chosen == y[held]).mean() or record["chosen"]["lr"] != 1e-2


def test_every_epoch_count_is_scored_by_one_run_and_equals_a_run_that_long() -> None:
    """mlp: the held-out score of (settings, E epochs) read from one longer run is that of an E-epoch fit."""
    from pipeline.stage2.heads.fitting import with_epochs
    from pipeline.stage2.tasks import TASKS

    X, y = separable_features(n=600, classes=3, spread=3.0)
    cfg = HeadConfig(head="mlp", epochs=4, hidden=16, device="cpu")
    head = build_head(cfg, num_classes=3, feature_dim=32)
    grid = with_epochs([{"lr": 1e-3, "weight_decay": 0.0}], 4)
    score = TASKS["classify"].held_out_score
    scores = head.sweep_scores(X[:480], y[:480], (X[480:], y[480:]), grid=grid, score=score)
    for point, got in zip(grid, scores):
        alone = build_head(HeadConfig(head="mlp", hidden=16, device="cpu", **point), num_classes=3, feature_dim=32)
        alone.fit(X[:480], y[:480])
        assert got == score(y[480:], alone.logits(X[480:]))
    assert len(set(scores)) > 1  # the epochs differ: the test could fail


def test_a_refit_that_fits_its_rows_worse_than_the_held_out_fit_is_not_kept(monkeypatch) -> None:
    """After a sweep, the head of the chosen settings refitted on all of train is compared with the same settings
    fitted on the rows the choice was scored from, on those rows: a refit that landed on a bad epoch is replaced."""
    from pipeline.stage2.heads.linear import LinearHead

    X, y = separable_features(n=500, classes=3, spread=1.0)
    rows = np.arange(400)
    cfg = HeadConfig(head="linear", epochs=4, lr=3e-3, device="cpu")
    refit = build_head(cfg, num_classes=3, feature_dim=32)
    result = refit.fit(X, y)
    kept, _, record = choice.check_refit(refit, result, X, y, rows=rows, val=None)
    assert kept is refit and record["refit"] == "checked"
    refit.weight, refit.bias = refit.weight[[1, 2, 0]], refit.bias[[1, 2, 0]]  # a refit gone wrong: classes swapped
    kept, _, record = choice.check_refit(refit, result, X, y, rows=rows, val=None)
    assert kept is not refit and isinstance(kept, LinearHead) and record["refit"] == "kept the held-out fit"
    assert (kept.logits(X[rows]).argmax(1) == y[rows]).mean() > 0.9
    knn = build_head(HeadConfig(head="knn"), num_classes=3, feature_dim=32)  # not trained for epochs: not checked
    assert choice.check_refit(knn, result, X, y, rows=rows, val=None)[2] == {}


SLOW = {"lr": 1e-6, "weight_decay": 0.0, "epochs": 2}  # two epochs at lr 1e-6: the linear and mlp defaults lose


@pytest.mark.parametrize(
    "name, defaults",
    [("logreg", {"C": 1e-6}), ("knn", {"k": 1}), ("ridge", {"alpha": 1e6}), ("linear", SLOW), ("mlp", SLOW)],
)
def test_the_guard_tests_the_outputs_the_sweep_scored_without_fitting_again(monkeypatch, name, defaults) -> None:
    """Every sweep keeps each grid point's held-out outputs (logreg's path, ridge, the generic sweep of k-NN, and
    each epoch of linear's and mlp's runs): the paired test of the chosen point against the defaults is on the very
    outputs its scores came from, with no second fit of either (on 60,000 x 1,280 real features, two logreg fits
    of ~10 s each, two mlp fits of ~10 s)."""
    from pipeline.stage2.protocol import HELD_OUT_FRACTION, sweep
    from pipeline.stage2.tasks import TASKS

    rng = np.random.default_rng(0)
    X, y = separable_features(n=1500, classes=4, spread=2.0)
    y = np.where(rng.random(1500) < 0.3, rng.integers(0, 4, 1500), y)  # noisy labels: k=1 and C=1e-6 lose
    head = build_head(HeadConfig(head=name, sweep=True, device="cpu", **defaults), num_classes=4, feature_dim=32)

    def refit(*args, **kwargs):
        raise AssertionError("the guard fitted a grid point again")

    monkeypatch.setattr(choice, "held_out_predictions", refit)
    _, record = sweep(head, X, y, task=TASKS["classify"])
    assert record["defaults"] == defaults and record["chosen"] != defaults
    assert not record["kept_defaults"] and record["p_value_vs_defaults"] < 0.05, record["note"]
    _, held, _ = TASKS["classify"].holdout(y, fraction=HELD_OUT_FRACTION, seed=0)
    for point, score in ((record["chosen"], record["chosen_score"]), (defaults, record["defaults_score"])):
        kept = head.held_out_logits[choice.sweep_key(point)]
        assert kept.shape == (len(held), 4) and (kept.argmax(1) == y[held]).mean() == pytest.approx(score)


def test_a_sweep_keeps_the_outputs_of_the_first_epochs_that_fit_its_budget_and_the_guard_fits_the_rest() -> None:
    """EpochScores keeps each epoch's outputs, as scored, while they fit ``keep_bytes``; the points of later epochs
    are missing from ``kept``, so choice.guard fits them again rather than testing other outputs."""
    from pipeline.stage2.heads.config import sweep_key
    from pipeline.stage2.heads.fitting import EpochScores, with_epochs

    y = np.array([0, 1, 1])
    watch = EpochScores(y, lambda t, z: float((z.argmax(1) == t).mean()), keep_bytes=2 * 2 * 3 * 2 * 4)
    epochs = [torch.randn(2, 3, 2) for _ in range(3)]  # (runs, rows, classes) after each of 3 epochs
    for out in epochs:
        watch(out)
    runs = [{"lr": 0.1}, {"lr": 0.2}]
    grid = with_epochs(runs, 3)
    assert len(watch.outputs) == 2 and watch.of(grid, runs, epochs=3)[2] == watch.rows[2][0]
    kept = watch.kept(grid, runs, epochs=3)
    assert set(kept) == {sweep_key(p) for p in grid if p["epochs"] <= 2}
    assert np.array_equal(kept[sweep_key({"lr": 0.2, "epochs": 2})], epochs[1][1].numpy())
    epochs[1].zero_()  # a copy was kept, not the caller's tensor
    assert kept[sweep_key({"lr": 0.2, "epochs": 2})].any()


def test_the_refit_check_tests_the_mlp_its_sweep_fitted_without_fitting_it_again(monkeypatch) -> None:
    """mlp's sweep keeps its parameters after each epoch: the head of each grid point is, to the bit, the head that
    fitting that point on the sweep's rows gives, and the refit's check tests it rather than fitting it again
    (48,000 x 1,280: ~10 s): a sweep's mlp is fitted once on all of train and never on the 80% again."""
    from dataclasses import replace

    from pipeline.stage2 import protocol
    from pipeline.stage2.heads.config import sweep_key
    from pipeline.stage2.heads.mlp import MLPHead
    from pipeline.stage2.tasks import TASKS

    X, y = separable_features(n=600, classes=3, spread=2.0)
    cfg = HeadConfig(head="mlp", sweep=True, epochs=3, device="cpu")
    dims = {"num_classes": 3, "feature_dim": 32}
    head = build_head(cfg, **dims)
    _, record = protocol.sweep(head, X, y, task=TASKS["classify"])
    assert set(head.held_out_fits) == {sweep_key(p) for p in record["grid"]}
    rows, held, _ = TASKS["classify"].holdout(y, fraction=protocol.HELD_OUT_FRACTION, seed=0)
    for point in (record["grid"][1], record["chosen"]):
        lone = build_head(replace(cfg, **point), **dims)
        lone.fit(X[rows], y[rows])
        scored = head.held_out_fits[sweep_key(point)]()
        assert np.array_equal(scored.logits(X), lone.logits(X))
        assert np.array_equal(scored.logits(X[held]), head.held_out_logits[sweep_key(point)])

    fits = []
    original = MLPHead.fit

    def counted(self, *args, **kwargs):
        fits.append(len(args[1]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MLPHead, "fit", counted)
    fitted = protocol.fit(cfg, X, y, val=(X[:50], y[:50]), dims=dims, task=TASKS["classify"])
    assert fits == [len(y)] and fitted.sweep["refit"] == "checked"  # the refit on all of train, and no other fit
