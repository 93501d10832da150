"""Heads on synthetic features: every registered head learns, round-trips through safetensors, and the
protocol pieces (batched linear grid, --sweep on held-out train, --shots, --class-weight) do what they say."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.stage2.heads import (
    HEADS,
    HeadConfig,
    KNNHead,
    LinearHead,
    balanced_weights,
    build_head,
    load_head,
    save_head,
)
from pipeline.stage2.tasks import TASKS
from pipeline.stage2.train import (
    compare_shots,
    few_shot,
    fit_and_evaluate,
    parse_shots,
    stratified_holdout,
    sweep,
    train_head,
)
from pipeline.store import FeatureSet, SplitFeatures, read_features
from tests.conftest import separable_features

FAST = {"epochs": 20, "lr": 1e-2, "hidden": 32, "k": 5, "device": "cpu"}


@pytest.mark.parametrize(
    "name", [name for name, spec in HEADS.items() if spec.inputs == "features"]
)  # tail: test_tail.py
def test_every_head_learns_and_round_trips(name: str, tmp_path: Path) -> None:
    X, y = separable_features(n=600, classes=4, spread=1.0)
    head = build_head(HeadConfig(head=name, **FAST), num_classes=4, feature_dim=32)
    head.fit(X[:400], y[:400])
    proba = head.predict_proba(X[400:])
    assert proba.shape == (200, 4) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == y[400:]).mean() > 0.95
    save_head(head, tmp_path, config={"head_config": {**vars(head.cfg)}, "classes": list("abcd"), "feature_dim": 32})
    loaded, _ = load_head(tmp_path)
    np.testing.assert_allclose(loaded.predict_proba(X[400:]), proba, rtol=1e-5, atol=1e-6)


def test_grid_members_train_independently() -> None:
    """Member 0 of a batched grid ends exactly where the same head trained alone ends."""
    X, y = separable_features(n=300, classes=3, spread=2.0)
    cfg = HeadConfig(head="linear", epochs=4, lr=3e-3, device="cpu")
    alone = LinearHead(cfg, num_classes=3, feature_dim=32)
    alone.fit(X, y)
    grid = [{"lr": 3e-3, "weight_decay": 0.0}, {"lr": 1.0, "weight_decay": 0.1}, {"lr": 1e-4, "weight_decay": 0.0}]
    model, histories, _ = LinearHead(cfg, num_classes=3, feature_dim=32)._fit_grid(X, y, grid=grid)
    np.testing.assert_allclose(model.weight[0].numpy(), alone.weight, rtol=1e-5, atol=1e-6)
    assert len(histories) == 3 and len(histories[0]) == 4
    assert not np.allclose(model.weight[1].numpy(), alone.weight)


@pytest.mark.parametrize("fused", [True, False])
def test_adam_matches_torch_optim(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pipeline.stage2.heads.fitting import Adam

    monkeypatch.setattr(Adam, "FUSED", fused and Adam.FUSED)  # the fused kernel, and the written-out fallback
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = Adam([{"params": a.parameters(), "lr": 0.1, "weight_decay": 0.01}])
    ref = torch.optim.Adam(b.parameters(), lr=0.1, weight_decay=0.01)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(5):
        for layer, opt in ((a, ours), (b, ref)):
            layer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(layer(x), y).backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.weight, torch.nn.Linear(5, 3).weight)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_analytic_training_matches_autograd(name: str) -> None:
    """The hand-written gradients give what autograd gives: same weights, same per-epoch history, class weights on."""
    import torch

    from pipeline.stage2.heads import MLPHead
    from pipeline.stage2.heads.fitting import TorchData

    X, y = separable_features(n=500, classes=3, spread=3.0)
    y[:150] = 0  # imbalanced, so "balanced" class weights change the loss
    cfg = HeadConfig(head=name, epochs=3, lr=3e-3, weight_decay=1e-3, batch_size=64, hidden=16, dropout=0.0)
    cfg = replace(cfg, class_weight="balanced", device="cpu")
    head = build_head(cfg, num_classes=3, feature_dim=32)
    fast = head.fit(X[:400], y[:400], val=(X[400:], y[400:])).history
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same initial weights as the head drew
        module = MLPHead(cfg, num_classes=3, feature_dim=32)._module() if name == "mlp" else torch.nn.Linear(32, 3)
    data = TorchData.build(X[:400], y[:400], val=(X[400:], y[400:]), cfg=cfg, num_classes=3, device=torch.device("cpu"))
    reference = _autograd_reference(module, data, cfg=cfg)
    assert [r["epoch"] for r in fast] == [1, 2, 3]
    for got, want in zip(fast, reference):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    ours = head.state()
    for key, value in module.state_dict().items():
        np.testing.assert_allclose(ours[key], value.numpy(), rtol=1e-4, atol=1e-6)


def _autograd_reference(module, data, *, cfg: HeadConfig) -> list[dict[str, float]]:
    """The loop the hand-written gradients replace: the same seeded batches, autograd, torch.optim.Adam."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, history = len(data.X), []

    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per = torch.nn.functional.cross_entropy(logits, y, weight=data.weight, reduction="none")
        return per.sum() / (data.weight[y].sum() if data.weight is not None else len(y))

    for epoch in range(1, cfg.epochs + 1):
        module.train()
        perm, seen, correct = torch.randperm(n, generator=gen), 0.0, 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            logits = module(data.X[idx])
            loss = loss_of(logits, data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += float(loss.detach()) * len(idx)
            correct += float((logits.argmax(1) == data.y[idx]).sum())
        module.eval()
        with torch.no_grad():
            val_logits = module(data.val[0])
            val_loss = float(loss_of(val_logits, data.val[1]))
            val_acc = float((val_logits.argmax(1) == data.val[1]).float().mean())
        history.append(
            {"epoch": epoch, "train_loss": seen / n, "train_accuracy": correct / n, "val_loss": val_loss,
             "val_accuracy": val_acc}
        )  # fmt: skip
    return history


def test_fitting_threads_is_one_on_cpu_and_restored() -> None:
    import torch

    from pipeline.stage2.heads.fitting import fitting_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest runs the suite on 1 thread, where "is 1 inside" could not fail
    try:
        with fitting_threads(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_knn_train_metrics_leave_one_out_on_a_sample(make_feature_file, monkeypatch: pytest.MonkeyPatch) -> None:
    """A point is never its own neighbour in knn's train metrics, and at most TRAIN_METRIC_ROWS rows are scored."""

    monkeypatch.setattr(KNNHead, "TRAIN_METRIC_ROWS", 500)
    X, y = _imbalanced()  # overlapping classes: with itself as a neighbour, k=1 would score 1.0
    head = build_head(HeadConfig(head="knn", k=1), num_classes=2, feature_dim=8)
    head.fit(X, y)
    assert (head.logits(X).argmax(1) == y).all()
    labels, proba, note = head.train_predictions(X, y)
    assert len(labels) == len(proba) == KNNHead.TRAIN_METRIC_ROWS < len(y)
    assert (proba.argmax(1) == labels).mean() < 0.97 and "leave-one-out" in note
    fs = read_features(make_feature_file("k.h5", spread=2.0))
    _, metrics, _ = fit_and_evaluate(fs, HeadConfig(head="knn", k=1))
    assert "leave-one-out" in metrics["train_metrics_note"] and metrics["train_accuracy"] > 0.9


def test_linear_sweep_scores_the_whole_grid_in_one_pass() -> None:
    X, y = separable_features(n=400, classes=4, spread=1.0)
    head = LinearHead(HeadConfig(epochs=3, device="cpu"), num_classes=4, feature_dim=32)
    grid = [{"lr": 1e-5, "weight_decay": 0.0}, {"lr": 1e-2, "weight_decay": 0.0}]
    scores = head.sweep_scores(X[:300], y[:300], (X[300:], y[300:]), grid=grid, score=TASKS["classify"].held_out_score)
    assert len(scores) == 2 and scores[1] > scores[0] and scores[1] > 0.9


def test_sweep_chooses_on_held_out_train_never_val(make_feature_file) -> None:
    fs = read_features(make_feature_file("a.h5", spread=2.0))
    cfg = HeadConfig(head="logreg", sweep=True)
    _, metrics, _ = fit_and_evaluate(fs, cfg)
    record = metrics["sweep"]
    assert len(record["grid"]) == len(record["held_out_accuracy"]) == 45
    assert record["chosen"] in record["grid"] and record["n_fit"] + record["n_held_out"] == len(fs.train)
    # Scramble val: the choice and the fitted head must not move.
    rng = np.random.default_rng(1)
    scrambled = replace(fs, splits={**fs.splits, "val": replace(fs.val, labels=rng.permutation(fs.val.labels))})
    head_a, _, _ = fit_and_evaluate(fs, cfg)
    head_b, metrics_b, _ = fit_and_evaluate(scrambled, cfg)
    assert metrics_b["sweep"]["chosen"] == record["chosen"]
    np.testing.assert_array_equal(head_a.weight, head_b.weight)


def test_sweep_records_grid_in_metrics_json_and_refits(feature_file: Path, tmp_path: Path) -> None:
    metrics = train_head(feature_file, HeadConfig(head="knn", sweep=True), out=tmp_path / "knn")
    saved = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert saved["sweep"]["grid"] == [{"k": k} for k in (1, 3, 5, 10, 20, 50)]
    assert saved["sweep"]["chosen"] == {
        "k": json.loads((tmp_path / "knn" / "config.json").read_text())["head_config"]["k"]
    }
    assert metrics["val_accuracy"] > 0.95
    centroid = train_head(feature_file, HeadConfig(head="centroid", sweep=True), out=tmp_path / "c")
    assert "no hyper-parameter" in centroid["sweep"]["note"]


def test_sweep_is_skipped_when_nothing_can_be_held_out() -> None:
    X, y = separable_features(n=4, classes=4)
    head = build_head(HeadConfig(head="logreg", sweep=True), num_classes=4, feature_dim=32)
    cfg, record = sweep(head, X, y, task=TASKS["classify"])
    assert cfg == head.cfg and "skipped" in record


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=2, max_size=6), seed=st.integers(0, 100))
def test_stratified_holdout_partitions_each_class(counts: list[int], seed: int) -> None:
    y = np.repeat(np.arange(len(counts)), counts)
    fit, held = stratified_holdout(y, fraction=0.2, seed=seed)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(y)
    for c, n in enumerate(counts):
        assert (y[fit] == c).sum() >= 1
        assert (y[held] == c).sum() == (0 if n < 2 else max(1, min(n - 1, round(0.2 * n))))


def test_few_shot_draws_k_per_class_with_a_seed() -> None:
    X, y = separable_features(n=100, classes=4)
    split = SplitFeatures(features=X, labels=y, ids=np.array([str(i) for i in range(100)]))
    a, b, c = (few_shot(split, shots=3, seed=s) for s in (0, 0, 1))
    assert np.bincount(a.labels).tolist() == [3, 3, 3, 3]
    assert list(a.ids) == list(b.ids) and list(a.ids) != list(c.ids)
    assert len(few_shot(split, shots=1000, seed=0)) == 100  # a class with fewer rows gives all of them


def test_compare_shots_table(feature_file: Path, tmp_path: Path) -> None:
    result = compare_shots(
        feature_file, heads=["centroid", "knn"], base=HeadConfig(k=1), shots=parse_shots("1,5,all"), out=tmp_path
    )
    assert result["shots"] == ["1", "5", "all"]
    assert set(result["val_accuracy"]) == {"centroid", "knn"}
    assert [r["n_train_used"] for r in result["runs"][:3]] == [4, 20, 400]
    assert (tmp_path / "shots.md").read_text().count("|") > 10 and (tmp_path / "shots.png").stat().st_size > 1000
    with pytest.raises(PipelineError, match="--shots"):
        parse_shots("1,two")


def _imbalanced(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping classes, 95:5: an unweighted head favours the majority."""
    rng = np.random.default_rng(seed)
    y = (rng.random(2000) < 0.05).astype(np.int64)
    X = rng.normal(0, 1, (2000, 8)).astype(np.float32)
    X[:, 0] += 1.5 * y
    return X, y


@pytest.mark.parametrize("name", ["linear", "logreg", "mlp", "knn"])
def test_balanced_class_weight_raises_minority_recall(name: str) -> None:
    X, y = _imbalanced()
    recalls = []
    for weighting in ("none", "balanced"):
        cfg = HeadConfig(head=name, class_weight=weighting, epochs=15, lr=3e-2, batch_size=500, hidden=16, k=25)
        head = build_head(cfg, num_classes=2, feature_dim=8)
        head.fit(X[:1500], y[:1500])
        pred = head.logits(X[1500:]).argmax(1)
        recalls.append((pred[y[1500:] == 1] == 1).mean())
    assert recalls[1] > recalls[0] + 0.2, recalls


def test_balanced_weights() -> None:
    w = balanced_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w, [4 / 6, 2.0, 0.0])


def test_logreg_standardisation_folds_into_one_linear_layer() -> None:
    import torch

    X, y = separable_features(n=300, classes=3, spread=2.0)
    X = X * 50 + 7  # far from standardised, so the fold matters
    head = build_head(HeadConfig(head="logreg"), num_classes=3, feature_dim=32)
    head.fit(X, y)
    with torch.no_grad():
        folded = head.as_module()(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(folded, head.logits(X), rtol=1e-4, atol=1e-4 * np.abs(folded).max())


def test_knn_is_cosine_and_centroid_is_nearest_mean() -> None:
    X, y = separable_features(n=200, classes=4, spread=1.0)
    knn = build_head(HeadConfig(head="knn", k=1), num_classes=4, feature_dim=32)
    knn.fit(X, y)
    assert (knn.logits(X).argmax(1) == y).all()  # each point is its own nearest neighbour
    np.testing.assert_array_equal(knn.logits(X * 7.0).argmax(1), knn.logits(X).argmax(1))  # scale-free
    centroid = build_head(HeadConfig(head="centroid"), num_classes=4, feature_dim=32)
    centroid.fit(X, y)
    means = np.stack([X[y == c].mean(0) for c in range(4)])
    nearest = ((X[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(centroid.logits(X).argmax(1), nearest)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"class_weight": "heavy"}, "--class-weight"),
        ({"dropout": 1.0}, "--dropout"),
        ({"shots": 0}, "--shots"),
        ({"k": 0}, "--k"),
    ],
)
def test_bad_head_config(kw: dict, fragment: str) -> None:
    with pytest.raises(PipelineError, match=fragment):
        HeadConfig(**kw)


def _feature_set(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray) -> FeatureSet:
    def split(X: np.ndarray, y: np.ndarray) -> SplitFeatures:
        return SplitFeatures(X, y, np.array([str(i) for i in range(len(y))]))

    classes = [f"c{i}" for i in range(int(max(ytr.max(), yva.max())) + 1)]
    splits = {"train": split(Xtr, ytr), "val": split(Xva, yva)}
    return FeatureSet(Path("in-memory.h5"), classes, splits, meta={"feature_dim": Xtr.shape[1]})


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_standardize_trains_on_tiny_features_and_folds_into_the_layer(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Features of ~1e-9 (a random-init MobileNetV2 gives such): the raw head stays at chance and says why;
    --standardize learns, and the saved head still takes raw features (the scaling folded into its first layer)."""
    import torch

    X, y = separable_features(n=600, classes=4, spread=1.0)
    X = (X * 1e-9 + 5e-9).astype(np.float32)
    fs = _feature_set(X[:400], y[:400], X[400:], y[400:])
    cfg = HeadConfig(head=name, epochs=10, lr=1e-2, hidden=32, device="cpu")
    with caplog.at_level("WARNING"):
        _, raw, _ = fit_and_evaluate(fs, cfg)
    assert raw["val_accuracy"] < 0.4 and "pass --standardize" in caplog.text
    caplog.clear()
    head, std, _ = fit_and_evaluate(fs, replace(cfg, standardize=True))
    assert std["val_accuracy"] > 0.95 and std["standardize"] is True and "tiny spread" not in caplog.text
    with torch.no_grad():
        layer = head.as_module()(torch.as_tensor(X[400:])).numpy()
    np.testing.assert_allclose(layer, head.logits(X[400:]), rtol=1e-4, atol=1e-4)
    save_head(head, tmp_path, config={"head_config": {**vars(head.cfg)}, "classes": list("abcd"), "feature_dim": 32})
    loaded, _ = load_head(tmp_path)
    assert (loaded.logits(X[400:]).argmax(1) == y[400:]).mean() > 0.95


def test_standardize_matches_training_on_standardised_features() -> None:
    """The fold is exact: a linear head with --standardize on X gives the logits of the same head trained on
    (X - mean) / std by hand."""
    X, y = separable_features(n=300, classes=3, spread=2.0)
    X = X * np.linspace(0.1, 10, 32, dtype=np.float32) + 3
    cfg = HeadConfig(head="linear", epochs=3, lr=3e-3, device="cpu")
    folded = LinearHead(replace(cfg, standardize=True), num_classes=3, feature_dim=32)
    folded.fit(X, y)
    Z = (X - X.mean(0)) / X.std(0)
    by_hand = LinearHead(cfg, num_classes=3, feature_dim=32)
    by_hand.fit(Z, y)
    np.testing.assert_allclose(folded.logits(X), by_hand.logits(Z), rtol=1e-4, atol=1e-4)


def test_a_cli_run_uses_the_head_config_defaults(feature_file: Path, tmp_path: Path, capsys) -> None:
    """The options are made from HeadConfig's fields: a run without options saves HeadConfig's defaults (of the
    settings the head uses: config.json lists only those)."""
    from dataclasses import asdict

    from tests.conftest import run

    code, _, err = run(
        ["train-head", "--features", str(feature_file), "--head", "knn", "--out", str(tmp_path / "c")], capsys
    )
    assert code == 0, err
    saved = json.loads((tmp_path / "c" / "config.json").read_text())["head_config"]
    defaults = asdict(HeadConfig(head="knn"))
    assert saved == {k: defaults[k] for k in ("head", *HEADS["knn"].settings)}


def test_train_head_on_a_missing_gpu_is_a_usage_error(feature_file: Path, capsys, monkeypatch) -> None:
    """Heads choose their device through pipeline.devices.resolve_device: --device cuda without CUDA is one line,
    exit 2, before the features are read."""
    import torch

    from tests.conftest import assert_one_line_error, run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["train-head"], ["compare"]):
        code, _, err = run([*command, "--features", str(feature_file), "--device", "cuda"], capsys)
        assert code == 2
        assert_one_line_error(code, err, "--device", "no CUDA GPU")


def _digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The committed digits as 64 raw pixel features: small real data for checks against scikit-learn."""
    from PIL import Image

    root = Path(__file__).resolve().parents[1] / "data" / "digits"
    X, y = [], []
    for c in range(10):
        for f in sorted((root / str(c)).glob("*.png")):
            X.append(np.asarray(Image.open(f).convert("L"), np.float32).ravel())
            y.append(c)
    return np.stack(X), np.asarray(y, np.int64)


@pytest.mark.parametrize("class_weight", ["none", "balanced"])
def test_torch_logreg_matches_sklearn(class_weight: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same objective as sklearn's LogisticRegression: in float64 with a tight tolerance, coefficients within 1e-3
    relative and val accuracy within 0.1 point, on the real digit pixels (with and without class weights)."""
    import torch

    from pipeline.stage2.heads.logreg import LogRegHead

    X, y = _digits_pixels()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    X, y = X[order], y[order]
    y[:60] = 0  # imbalanced, so the class weights matter
    tr, va = slice(0, 1400), slice(1400, None)
    from sklearn.linear_model import LogisticRegression

    cfg = HeadConfig(head="logreg", C=0.05, tol=1e-9, max_iter=5000, class_weight=class_weight, device="cpu")
    Xtr = X[tr].astype(np.float64)
    mean, std = Xtr.mean(0), Xtr.std(0)
    std[std == 0] = 1.0
    ref = LogisticRegression(
        C=cfg.C, tol=1e-10, max_iter=10_000, class_weight=None if class_weight == "none" else "balanced"
    )
    ref.fit((Xtr - mean) / std, y[tr])  # float64 throughout: the reference
    monkeypatch.setattr(LogRegHead, "DTYPE", torch.float64)
    ours = build_head(cfg, num_classes=10, feature_dim=64)
    info = ours.fit(X[tr], y[tr]).info
    assert info["converged"] and info["solver"] == "torch"
    rel = np.abs(ours.weight - ref.coef_).max() / np.abs(ref.coef_).max()
    assert rel < 1e-3, rel
    np.testing.assert_allclose(ours.bias, ref.intercept_, atol=1e-3 * np.abs(ref.intercept_).max())
    Zva = (X[va] - mean) / std
    acc = [(ours.logits(X[va]).argmax(1) == y[va]).mean(), ref.score(Zva, y[va])]
    assert abs(acc[0] - acc[1]) <= 0.001 and acc[0] > 0.9


def test_logreg_path_warm_starts_cost_few_fits() -> None:
    """The 45-value sweep along the path (on 80% of train, as --sweep runs it) costs at most 3x the work of one fit
    on all of train at the chosen C: iterations times rows."""
    from pipeline.stage2.heads.logreg import LogRegHead

    X, y = _digits_pixels()
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order], y[order]
    head = LogRegHead(HeadConfig(head="logreg", device="cpu"), num_classes=10, feature_dim=64)
    grid = LogRegHead.sweep_grid(head.cfg)
    scores = head.sweep_scores(
        X[:1400], y[:1400], (X[1400:], y[1400:]), grid=grid, score=TASKS["classify"].held_out_score
    )
    best = grid[int(np.argmax(scores))]
    one = LogRegHead(replace(head.cfg, **best), num_classes=10, feature_dim=64).fit(X, y).info
    assert len(scores) == 45 and max(scores) > 0.9
    assert head.sweep_info["iterations"] * 1400 <= 3 * one["n_iter"] * len(y), (head.sweep_info, one)


def test_knn_scores_the_same_in_small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a block of 5 queries' worth of similarities, the answer is the same as in one block."""

    X, y = separable_features(n=300, classes=4, spread=2.0)
    head = build_head(HeadConfig(head="knn", k=5, device="cpu"), num_classes=4, feature_dim=32)
    head.fit(X[:200], y[:200])
    whole = head.logits(X[200:])
    monkeypatch.setattr(KNNHead, "CHUNK_ELEMENTS", 5 * 200)
    np.testing.assert_allclose(head.logits(X[200:]), whole, rtol=1e-6, atol=1e-6)


def _clustered_unit_rows(n: int, *, dim: int = 64, centres: int = 5, seed: int = 0, noise: float = 0.05):
    """Unit rows in tight clusters: many similarities within bfloat16's error of each other, the case the coarse
    k-NN pass must not get wrong."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=g)
    x = c[torch.arange(n) % centres] + noise * torch.randn(n, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("use_exclude", [False, True])
def test_knn_coarse_bf16_pass_finds_the_float32_neighbours(use_exclude: bool) -> None:
    """``nearest`` with the bfloat16 pass returns the float32 top-k (same rows, same float32 similarities) where
    a plain bfloat16 top-k would not, with and without a row excluded per query (leave-one-out)."""
    import torch

    from pipeline.stage2.heads.knn import Coarse, coarse_error, nearest
    from pipeline.stage2.heads.knn import exact_topk as _exact_topk

    train = _clustered_unit_rows(3000)
    q = _clustered_unit_rows(200, seed=1)
    exclude = torch.randint(3000, (200,), generator=torch.Generator().manual_seed(2)) if use_exclude else None
    if use_exclude:  # the excluded row is the query's true nearest: the case where excluding matters
        exclude = (q @ train.T).argmax(1)
    want_sim, want_idx = _exact_topk(q, train, k=10, exclude=exclude)
    found = nearest(q, train, k=10, exclude=exclude, coarse=Coarse.of(train), limit=math.inf)
    assert found is not None  # the rescoring path, however many rows it rescores
    sim, idx = found
    np.testing.assert_allclose(sim.numpy(), want_sim.numpy(), rtol=0, atol=1e-6)
    exact = q @ train.T
    for i in np.flatnonzero((np.sort(idx.numpy(), 1) != np.sort(want_idx.numpy(), 1)).any(1)):
        # only a float32 tie (two summation orders of the same dot product) may resolve the other way
        assert (exact[i, idx[i]] - want_sim[i, -1]).abs().min() < 1e-6
    approx = (q.bfloat16() @ train.bfloat16().T).float()
    if exclude is not None:
        approx[torch.arange(200), exclude] = -float("inf")
        assert not (idx == exclude[:, None]).any()
    plain = approx.topk(10, dim=1).indices
    assert (np.sort(plain.numpy(), 1) != np.sort(want_idx.numpy(), 1)).any()  # the plain coarse pass is wrong
    assert ((approx - q @ train.T).abs().nan_to_num(posinf=0, neginf=0) <= coarse_error(64)).all()  # the bound


def test_knn_head_gives_the_same_votes_with_and_without_the_coarse_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pipeline.stage2.heads import knn

    X = _clustered_unit_rows(1200, noise=0.2).numpy()  # no float32 ties among the neighbours; bf16 ones, yes
    y = np.arange(1200) % 3  # labels not tied to the clusters: a wrong neighbour changes the votes
    head = build_head(HeadConfig(head="knn", k=7, device="cpu"), num_classes=3, feature_dim=64)
    head.fit(X[:1000], y[:1000])
    monkeypatch.setattr(knn, "_fast_bf16", lambda device: True)
    coarse = head.logits(X[1000:]), head.train_predictions(X[:1000], y[:1000])[1]
    monkeypatch.setattr(knn, "_fast_bf16", lambda device: False)
    exact = head.logits(X[1000:]), head.train_predictions(X[:1000], y[:1000])[1]
    for a, b in zip(coarse, exact):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    q = torch.as_tensor(X[1000:])
    plain = (q.bfloat16() @ torch.as_tensor(X[:1000]).bfloat16().T).float().topk(7, dim=1).indices
    assert (plain.sort(1).values != (q @ torch.as_tensor(X[:1000]).T).topk(7, dim=1).indices.sort(1).values).any()


def test_knn_on_nearly_parallel_features_is_exact_float32_and_rescores_few_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Features that all point nearly the same way (a random-init backbone): the whole similarity in bfloat16 would
    leave every row within its bound of the k-th. Split along the mean direction, the bound shrinks with the
    residuals and only a few rows a query are rescored; the neighbours are the brute-force float32 ones. Without
    the split the search falls back to the exact blocked float32 top-k (blocks smaller than train here)."""
    import torch

    from pipeline.stage2.heads import knn

    g = np.random.default_rng(0)
    base = g.random(48).astype(np.float32) + 0.5
    X = (base + 0.01 * g.standard_normal((1500, 48))).astype(np.float32)  # cosine ~0.9999 between any two rows
    y = g.integers(0, 3, 1500)
    monkeypatch.setattr(knn, "_fast_bf16", lambda device: True)
    monkeypatch.setattr(knn, "EXACT_BLOCK_ROWS", 300)  # several train blocks: the merge of block top-k's
    monkeypatch.setattr(knn, "RESCORE_COST", 4)  # train is small here: up to 300 rows a query may be rescored
    rescored = []
    real_rescore = knn._rescore
    monkeypatch.setattr(
        knn, "_rescore", lambda q, t, qi, ti, **kw: rescored.append(len(ti)) or real_rescore(q, t, qi, ti, **kw)
    )
    head = build_head(HeadConfig(head="knn", k=5, device="cpu"), num_classes=3, feature_dim=48)
    head.fit(X[:1200], y[:1200])
    votes = head.logits(X[1200:])
    assert rescored and sum(rescored) <= 200 * 300  # ~135 rows a query (float32 near-ties), not all 1,200
    train, q = torch.as_tensor(knn._l2_normalise(X[:1200])), torch.as_tensor(knn._l2_normalise(X[1200:]))
    truth = q.double() @ train.double().T  # brute force in float64: float32's own rounding is ~1e-7
    kth = truth.topk(5, dim=1).values[:, -1:]
    spread = (truth.max(1).values - truth.min(1).values).min()
    assert spread < 1e-3  # nearly parallel: far inside bfloat16's error bound (~1e-2)

    def votes_of(sim: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
        w = torch.zeros(300, 3).scatter_add_(
            1, torch.as_tensor(y[:1200])[idx], torch.exp(sim / knn.KNNHead.TEMPERATURE)
        )
        return torch.log(w / w.sum(1, keepdim=True) + 1e-6).numpy()

    found = knn.nearest(q, train, k=5, coarse=knn.Coarse.of(train))
    np.testing.assert_allclose(votes, votes_of(*found), rtol=1e-5, atol=1e-5)  # the head's search is this one
    for sim, idx in (found, knn.exact_topk(q, train, k=5)):  # each the true top 5, up to float32 ties
        assert (truth.gather(1, idx) >= kth - 1e-6).all()
        np.testing.assert_allclose(sim.numpy(), truth.gather(1, idx).numpy(), rtol=0, atol=1e-6)
        assert (truth.gather(1, idx) - kth).min() > -1e-6 and spread > 1e-5  # the neighbours are not all ties
    # unsplit (the whole similarity in bfloat16) the coarse pass would rescore nearly every row: it is not taken
    monkeypatch.setattr(knn, "SPLIT_BELOW", 0.0)
    assert not knn.Coarse.of(train).is_split
    assert knn.nearest(q, train, k=5, coarse=knn.Coarse.of(train), limit=0.9 * len(train)) is None


def test_knn_rescoring_split_over_the_cores_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidates' float32 similarities, scored in slices on two threads (fitting.in_pieces), are the serial
    loop's to the bit, and each query's k best of them are the brute-force ones among its candidates."""
    import torch

    from pipeline.stage2.heads import fitting, knn

    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(50, 64, generator=g), dim=1)
    qi = torch.arange(50).repeat_interleave(60)  # 60 candidates a query, grouped by query: 3,000 pairs
    ti = torch.randint(0, 3000, (3000,), generator=g)
    answers = {}
    for ways in (1, 2):
        monkeypatch.setattr(fitting, "_ways", lambda ways=ways: ways)
        answers[ways] = knn._rescore(q, train, qi, ti, k=5)
    assert len(ti) >= 2 * knn.RESCORE_ROWS  # large enough to be split
    assert torch.equal(answers[1][0], answers[2][0]) and torch.equal(answers[1][1], answers[2][1])
    exact = (train[ti] * q[qi]).sum(1).view(50, 60)
    assert torch.equal(answers[2][0], exact.topk(5, dim=1).values)


def _low_rank_unit_rows(n: int, *, dim: int = 96, rank: int = 8, noise: float = 0.02, parallel: bool = False):
    """Unit rows near a ``rank``-dimensional subspace (as real features are: 99% of MobileNetV2's energy in a fifth of
    its dimensions); with ``parallel``, all near one direction too (a random-init backbone: cosine ~0.999)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g) + noise * torch.randn(
        n, dim, generator=g
    )
    if parallel:
        x = 0.3 * x / x.norm(dim=1, keepdim=True) + torch.rand(dim, generator=g) + 0.5
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_knn_projected_pass_finds_the_float32_neighbours(
    parallel: bool, use_exclude: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU without fast bfloat16 the coarse pass is float32 on train's top eigenvectors (Projected): its bound
    holds for every pair, and ``nearest`` returns the float32 top-k (up to float32 ties) rescoring a few rows a
    query, on low-rank features and on features that all point nearly the same way, with and without a row excluded
    per query (leave-one-out)."""

    import torch

    from pipeline.stage2.heads import knn

    monkeypatch.setattr(knn, "PROJECT_MIN_ROWS", 1000)
    rows = _low_rank_unit_rows(3200, parallel=parallel, noise=0.4)
    train, q = rows[:3000], rows[3000:]
    if parallel:
        assert (q @ train.T).min() > 0.99  # nearly the same direction: far inside bfloat16's error (~1e-2)
    exclude = (q @ train.T).argmax(1) if use_exclude else None  # the excluded row is the query's true nearest
    projected = knn.Projected.of(train)
    assert projected is not None and projected.rows.shape[1] < train.shape[1] // 2 + 1
    a, rest = knn._project(q, projected.basis)
    truth = q.double() @ train.double().T
    gap = (truth - a.double() @ projected.rows[:, :-1].double().T).abs()
    assert (gap <= rest.double()[:, None] * projected.rest.double() + projected.margin).all()  # the bound
    rescored = []
    real = knn._rescore
    monkeypatch.setattr(
        knn, "_rescore", lambda q, t, qi, ti, **kw: rescored.append(len(ti)) or real(q, t, qi, ti, **kw)
    )
    found = knn.nearest(q, train, k=10, exclude=exclude, coarse=projected, limit=math.inf)
    assert found is not None and 10 * 200 <= sum(rescored) <= 200 * 300  # a few rows a query, not all 3,000
    sim, idx = found
    want_sim, want_idx = knn.exact_topk(q, train, k=10, exclude=exclude)
    np.testing.assert_allclose(sim.numpy(), want_sim.numpy(), rtol=0, atol=1e-6)
    kth = truth.gather(1, want_idx).min(1, keepdim=True).values
    assert (truth.gather(1, idx) >= kth - 1e-6).all()  # any other row is a float32 tie with the k-th
    plain = a @ projected.rows[:, :-1].T  # the projection alone, without the bound on the rest: other neighbours
    if exclude is not None:
        assert not (idx == exclude[:, None]).any()
        plain[torch.arange(len(q)), exclude] = -math.inf
    assert (plain.topk(10, dim=1).indices.sort(1).values != want_idx.sort(1).values).any()


def test_knn_head_takes_the_projected_pass_on_a_cpu_without_fast_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's votes (val and the leave-one-out train metrics) are the same with the projected pass as with the
    exact one."""
    from pipeline.stage2.heads import knn

    monkeypatch.setattr(knn, "PROJECT_MIN_ROWS", 1000)
    monkeypatch.setattr(knn, "_fast_bf16", lambda device: False)
    X = _low_rank_unit_rows(1500, noise=0.2).numpy()
    y = np.arange(1500) % 3  # labels not tied to the rows: a wrong neighbour changes the votes
    head = build_head(HeadConfig(head="knn", k=7, device="cpu"), num_classes=3, feature_dim=96)
    head.fit(X[:1200], y[:1200])
    projected = head.logits(X[1200:]), head.train_predictions(X[:1200], y[:1200])[1]
    assert isinstance(head._coarse_of[1], knn.Projected)
    monkeypatch.setattr(knn.Projected, "of", classmethod(lambda cls, train: None))
    head._coarse_of = None
    exact = head.logits(X[1200:]), head.train_predictions(X[:1200], y[:1200])[1]
    assert head._coarse_of[1] is None
    for a, b in zip(projected, exact):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_knn_groups_of_train_rows_hold_each_row_once_and_their_largest_score() -> None:
    """The groups of columns (k-NN's strided ones, the audit's runs of consecutive columns; then the columns after
    group * G one a group) hold every column exactly once, for any number of columns, and each group's largest
    score is that of its columns."""
    import torch

    from pipeline.stage2.heads import knn

    g = torch.Generator().manual_seed(0)
    for group, n in itertools.product((knn.GROUP, knn.STRIDED_BELOW), (1, 15, 16, 32, 80, 83, 160, 163)):
        scores = torch.randn(4, n, generator=g)  # k-NN's strided groups and the audit's runs of columns
        best = knn.group_max(scores, group)
        rows, one = knn.group_members(torch.arange(best.shape[1]), n, group)
        assert torch.equal(rows[one].sort().values, torch.arange(n))  # each row in one group, once
        assert torch.equal(best, scores[:, rows].masked_fill(~one, -math.inf).amax(2))


@pytest.mark.parametrize("use_exclude", [False, True])
def test_knn_screening_finds_the_neighbours_from_any_seed(use_exclude: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The threshold set from a query's single best group of a few rows (the weakest seed) still keeps every true
    neighbour, among rows in whole groups and in the one-row groups after them (train's size not a multiple of
    GROUP; there the queries' nearest rows): the float32 top-k, and an excluded row never among them."""
    import torch

    from pipeline.stage2.heads import knn

    monkeypatch.setattr(knn, "GROUP", 7)
    monkeypatch.setattr(knn, "SEED_GROUPS", 1)
    q = _clustered_unit_rows(200, seed=1)
    train = torch.cat([_clustered_unit_rows(3000), q[:3] + 0.001])  # 3,003 = 7 x 429: no tail...
    train = torch.cat([train, q[3:5] + 0.001])  # ... and 2 rows after the whole groups
    train = train / train.norm(dim=1, keepdim=True)
    assert len(train) % knn.GROUP == 2
    exclude = (q @ train.T).argmax(1) if use_exclude else None
    sim, idx = knn.nearest(q, train, k=5, exclude=exclude, coarse=knn.Coarse.of(train), limit=math.inf)
    want_sim, want_idx = knn.exact_topk(q, train, k=5, exclude=exclude)
    np.testing.assert_allclose(sim.numpy(), want_sim.numpy(), rtol=0, atol=1e-6)
    exact = q @ train.T
    for i in np.flatnonzero((np.sort(idx.numpy(), 1) != np.sort(want_idx.numpy(), 1)).any(1)):
        assert (exact[i, idx[i]] - want_sim[i, -1]).abs().min() < 1e-6  # only a float32 tie
    if exclude is not None:
        assert not (idx == exclude[:, None]).any()
    else:
        assert idx[3:5, 0].tolist() == [3003, 3004]  # the rows after the whole groups, found


def test_correlation_preconditioner_is_the_ridged_inverse_and_cuts_iterations() -> None:
    """``q -> q (Sigma + RIDGE I)^-1`` on the weight columns, the intercept as is; on correlated features L-BFGS
    with it reaches the same optimum in fewer iterations."""
    import torch

    from pipeline.stage2.heads import lbfgs

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    Z = (X - X.mean(0)) / X.std(0, unbiased=False)
    P = lbfgs.correlation_preconditioner(Z)
    q = torch.randn(3, 41, generator=g, dtype=torch.float64)
    want = q[:, :-1] @ torch.linalg.inv(Z.T @ Z / len(Z) + lbfgs.RIDGE * torch.eye(40, dtype=torch.float64))
    torch.testing.assert_close(P(q)[:, :-1], want)
    torch.testing.assert_close(P(q)[:, -1], q[:, -1])
    y = (Z @ torch.randn(40, 3, generator=g, dtype=torch.float64)).argmax(1)
    problem = lbfgs.Problem.build(Z, y, classes=3, class_weight=None)

    def fg(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return problem.loss_grad(t, 1e-3)

    start = torch.zeros(3, 41, dtype=torch.float64)
    plain = lbfgs.lbfgs(fg, start, max_iter=2000, tol=1e-8)
    pre = lbfgs.lbfgs(fg, start, max_iter=2000, tol=1e-8, precondition=P)
    assert plain.converged and pre.converged and pre.n_iter < plain.n_iter, (pre.n_iter, plain.n_iter)
    torch.testing.assert_close(pre.theta, plain.theta, rtol=1e-4, atol=1e-5)


def test_lbfgs_keeps_its_history_of_pairs_and_more_on_big_cpu_problems() -> None:
    """``history`` bounds the pairs kept (the same optimum either way); the logreg head's fits keep LONG_HISTORY on
    big problems on a CPU (fewer iterations measured there) and HISTORY on small ones (as before)."""
    import torch

    from pipeline.stage2.heads import lbfgs

    g = torch.Generator().manual_seed(1)
    Z = torch.randn(1500, 30, generator=g, dtype=torch.float64) @ torch.randn(30, 30, generator=g, dtype=torch.float64)
    y = (Z @ torch.randn(30, 4, generator=g, dtype=torch.float64)).argmax(1)
    problem = lbfgs.Problem.build(Z, y, classes=4, class_weight=None)
    sols = {}
    for history in (3, 10, 25):
        pairs: list = []
        start = torch.zeros(4, 31, dtype=torch.float64)
        sols[history] = lbfgs.lbfgs(lambda t: problem.loss_grad(t, 1e-3), start, max_iter=500, tol=1e-9, pairs=pairs,
                                    history=history)  # fmt: skip
        assert sols[history].converged and sols[history].n_iter > history and len(pairs) == history
    for history in (3, 25):
        torch.testing.assert_close(sols[history].theta, sols[10].theta, rtol=1e-4, atol=1e-5)
    big = torch.zeros(lbfgs.SPLIT_ENTRIES // 64 + 1, 64)
    assert lbfgs.history_for(big) == lbfgs.LONG_HISTORY > lbfgs.HISTORY == lbfgs.history_for(big[:100])
    if torch.cuda.is_available():
        assert lbfgs.history_for(big.cuda()) == lbfgs.HISTORY


def test_centroid_temperature_is_the_best_of_its_grid() -> None:
    """The fitted temperature has the lowest train log-loss of the 25-point grid (computed here in numpy)."""
    from pipeline.stage2.heads.base import softmax

    X, y = separable_features(n=400, classes=4, spread=3.0)
    head = build_head(HeadConfig(head="centroid"), num_classes=4, feature_dim=32)
    t = head.fit(X, y).info["temperature"]
    means = np.stack([X[y == c].astype(np.float64).mean(0) for c in range(4)])
    z = 2 * X @ means.T - (means**2).sum(1)
    spread = np.std(z - z.mean(1, keepdims=True))
    grid = spread * np.logspace(-3, 1, 25)
    losses = [-np.log(np.clip(softmax(z / g)[np.arange(len(y)), y], 1e-12, None)).mean() for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(losses))], rel=1e-4)
    np.testing.assert_allclose(head.weight, (2 * means / t).astype(np.float32), rtol=1e-4, atol=1e-6)


def test_cuda_takes_larger_steps_only_with_the_default_batch_and_enough_rows() -> None:
    """On CUDA the default batch (none given) grows (lr x sqrt of the factor) while an epoch keeps MIN_STEPS steps;
    on the CPU, with a chosen batch, or on small data, the default or given batch runs as it is."""
    import torch

    from pipeline.stage2.heads.config import DEFAULT_BATCH
    from pipeline.stage2.heads.fitting import CUDA_BATCH_FACTOR, MIN_STEPS, ran_with, scaled_for_device

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    cfg = HeadConfig(head="linear")
    assert cfg.batch_size is None and cfg.rows_per_step == DEFAULT_BATCH
    ran, factor = scaled_for_device(cfg, n=50_000, device=cuda)
    assert ran.batch_size == CUDA_BATCH_FACTOR * DEFAULT_BATCH and factor == pytest.approx(CUDA_BATCH_FACTOR**0.5)
    assert ran.lr == pytest.approx(cfg.lr * factor) and 50_000 // ran.batch_size >= MIN_STEPS
    assert ran_with(cfg, n=50_000, device=cuda) == {"batch_size_run": ran.batch_size, "lr_factor_run": factor}
    assert scaled_for_device(cfg, n=1_437, device=cuda) == (replace(cfg, batch_size=DEFAULT_BATCH), 1.0)  # digits
    assert scaled_for_device(cfg, n=50_000, device=cpu) == (replace(cfg, batch_size=DEFAULT_BATCH), 1.0)
    assert scaled_for_device(replace(cfg, batch_size=256), n=50_000, device=cuda)[0].batch_size == 256
    assert ran_with(cfg, n=50_000, device=cpu) == {}


def test_an_explicit_batch_of_128_runs_128_on_cuda() -> None:
    """The bug: 128 (the default's value) given on purpose was taken for "not set" and grew to 1,024 on CUDA."""
    import torch

    from pipeline.stage2.heads.fitting import ran_with, scaled_for_device

    cfg = HeadConfig(head="mlp", batch_size=128, lr=1e-3)
    ran, factor = scaled_for_device(cfg, n=50_000, device=torch.device("cuda"))
    assert (ran.batch_size, ran.lr, factor) == (128, 1e-3, 1.0)
    assert ran_with(cfg, n=50_000, device=torch.device("cuda")) == {}


def test_shuffles_on_the_device_reproducibly_with_the_seed() -> None:
    """Batches are drawn by ``torch.randperm`` on the rows' device from the seed: the same seed gives the same
    head, another seed another one."""
    X, y = separable_features(n=300, classes=3, spread=2.0)
    cfg = HeadConfig(head="mlp", epochs=2, batch_size=32, hidden=8, device="cpu")

    def fit(seed: int) -> np.ndarray:
        head = build_head(replace(cfg, seed=seed), num_classes=3, feature_dim=32)
        head.fit(X, y)
        return head.state()["0.weight"]

    np.testing.assert_array_equal(fit(0), fit(0))
    assert not np.array_equal(fit(0), fit(1))


def test_knn_normalises_huge_and_tiny_features() -> None:
    """Squares of float32 features above ~1e19 overflow: k-NN sat at chance on features scaled by 1e30."""
    from pipeline.stage2.heads.knn import _l2_normalise

    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 16)).astype(np.float32)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    for scale in (1e-30, 1.0, 1e30):
        np.testing.assert_allclose(_l2_normalise(X * np.float32(scale)), unit, rtol=1e-5, atol=1e-6)
    # rows of every scale in one array: only those whose squares over- or underflow are rescaled first
    mixed = X * np.float32([1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e17, 1e30, 1e37, 1.0, 1.0] * 2)[:, None]
    np.testing.assert_allclose(_l2_normalise(mixed), unit, rtol=1e-5, atol=1e-6)
    assert np.isfinite(_l2_normalise(np.zeros((2, 16), np.float32))).all()  # a zero row stays a zero row


def test_transposed_problem_has_the_same_loss_and_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The logits from Z's transposed copy (logreg's problem on a CPU): the loss and gradient of :class:`Problem`,
    with and without class weights, up to the rounding of the other summation order."""
    import torch

    from pipeline.stage2.heads import lbfgs

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(500, 30, generator=g, dtype=torch.float64)
    assert lbfgs.TransposedProblem.of(lbfgs.Problem.build(Z, torch.zeros(500, dtype=torch.long), classes=2,
                                                          class_weight=None)).__class__ is lbfgs.Problem  # fmt: skip
    monkeypatch.setattr(lbfgs, "TRANSPOSED_MIN_DIM", 30)  # 30 features: the copy from here on
    y = torch.randint(0, 4, (500,), generator=g)
    theta = torch.randn(4, 31, generator=g, dtype=torch.float64)
    for weight in (None, torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)):
        plain = lbfgs.Problem.build(Z, y, classes=4, class_weight=weight)
        transposed = lbfgs.TransposedProblem.of(plain)
        assert isinstance(transposed, lbfgs.TransposedProblem)
        (f, grad), (ft, gradt) = plain.loss_grad(theta, 0.01), transposed.loss_grad(theta, 0.01)
        assert abs(float(f - ft)) < 1e-12
        np.testing.assert_allclose(gradt.numpy(), grad.numpy(), rtol=1e-10, atol=1e-12)
    multi = lbfgs.OneVsRestProblem.build_multi(Z, (torch.rand(500, 3, generator=g) > 0.5).long())
    assert lbfgs.TransposedProblem.of(multi) is multi  # one-vs-rest keeps its own loss


@pytest.mark.parametrize("ways", [2, 3])
def test_logreg_evaluation_in_threads_is_the_same_to_the_bit(ways: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two matmuls of an L-BFGS evaluation split in pieces run by threads (slices of the outputs, never of a
    sum) give the same loss and gradient to the bit as one call each, in both layouts: the fit's iterates and
    predictions do not depend on the cores."""
    import torch

    from pipeline.stage2.heads import fitting, lbfgs

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(3001, 700, generator=g)
    y = torch.randint(0, 5, (3001,), generator=g)
    theta = torch.randn(5, 701, generator=g) * 0.1
    monkeypatch.setattr(lbfgs, "TRANSPOSED_MIN_DIM", 1)
    monkeypatch.setattr(fitting, "_ways", lambda: ways)
    plain = lbfgs.Problem.build(Z, y, classes=5, class_weight=None)
    for problem in (plain, lbfgs.TransposedProblem.of(plain)):
        monkeypatch.setattr(lbfgs, "SPLIT_ENTRIES", 1 << 62)
        f1, g1 = problem.loss_grad(theta, 0.01)
        monkeypatch.setattr(lbfgs, "SPLIT_ENTRIES", 0)
        f2, g2 = problem.loss_grad(theta, 0.01)
        assert torch.equal(f1, f2) and torch.equal(g1, g2), type(problem).__name__


def test_pieces_run_in_a_forked_child_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child forked after the pieces' threads started (a loader worker, say) has none of them: it starts its own
    instead of waiting forever on the parent's."""
    import os
    import signal

    from pipeline.stage2.heads import fitting

    monkeypatch.setattr(fitting, "_ways", lambda: 2)
    seen: list[int] = []
    fitting.in_pieces(lambda part: seen.append(part.start), 10, big=True)
    assert sorted(seen) == [0, 5]
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the pieces ran (killed by the alarm if it waits on the parent's threads)
        signal.alarm(30)
        done: list[int] = []
        fitting.in_pieces(lambda part: done.append(part.start), 10, big=True)
        os._exit(0 if sorted(done) == [0, 5] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_pieces_run_under_the_callers_inference_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference mode is thread-local: a piece writing in place into a tensor made under ``torch.inference_mode`` (the
    audit's folds call the L-BFGS problem that way) ran outside it in the worker thread and was refused."""
    import torch

    from pipeline.stage2.heads import fitting

    monkeypatch.setattr(fitting, "_ways", lambda: 2)
    with torch.inference_mode():
        z = torch.zeros(10)
        fitting.in_pieces(lambda part: z[part].add_(1), 10, big=True)
    assert z.tolist() == [1.0] * 10
    w = torch.zeros(10, requires_grad=True)
    with torch.no_grad():  # grad mode follows the caller too: an in-place write to a leaf needing grad is allowed
        fitting.in_pieces(lambda part: w[part].add_(1), 10, big=True)
    assert w.detach().tolist() == [1.0] * 10


@pytest.mark.parametrize("ways", [1, 2])
def test_logreg_keeps_one_standardised_copy_in_the_transposed_layout(
    ways: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From 1,024 features logreg standardises straight into the (D, N) layout its logits use and keeps no (N, D)
    copy beside it (``Z`` is a view of ``Zt``): the same standardised values, and the same loss and gradient to the
    bit as with a separate contiguous ``Z``, whether the matmuls run in one piece or in threads."""
    import torch

    from pipeline.stage2.heads import fitting, lbfgs
    from pipeline.stage2.heads.logreg import logreg_problem, standardise

    monkeypatch.setattr(fitting, "_ways", lambda: ways)
    monkeypatch.setattr(lbfgs, "SPLIT_ENTRIES", 0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3001, 1100, generator=g) * 3 + 1
    y = np.random.default_rng(0).integers(0, 4, 3001)
    problem, *_ = logreg_problem(X, y, class_weight="none", num_classes=4)
    assert isinstance(problem, lbfgs.TransposedProblem) and problem.Z.data_ptr() == problem.Zt.data_ptr()
    mean, scale = standardise(X)
    Z = (X - mean) / scale
    assert torch.equal(problem.Zt, Z.t())
    separate = lbfgs.TransposedProblem(Z, problem.target, problem.share, Z.t().contiguous(), problem.target_t)
    theta = torch.randn(4, 1101, generator=g) * 0.1
    (f1, g1), (f2, g2) = problem.loss_grad(theta, 0.01), separate.loss_grad(theta, 0.01)
    assert torch.equal(f1, f2) and torch.equal(g1, g2)
