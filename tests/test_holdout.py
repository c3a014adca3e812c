"""The unseen-generator protocol: what the loop is fed, what the report says, what is refused.

The leak checks look at the item lists the training loop actually receives (a spy around
``recipes.fit`` that records them and calls the real loop), not at the configuration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipguard.cli import train as train_cli
from clipguard.cli.main import build_parser, main
from clipguard.training import holdout, recipes, zoo
from clipguard.training.data import UNKNOWN_SOURCE, LabelledImage
from clipguard.training.evaluate import Scored, seen_unseen, summarize
from clipguard.training.loop import TrainConfig
from clipguard.training.metrics import roc_auc
from clipguard.training.report import seen_unseen_table


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digest(item: LabelledImage) -> str:
    assert item.image is not None
    return hashlib.sha256(np.asarray(item.image).tobytes()).hexdigest()


def _spy_fit(mp: pytest.MonkeyPatch) -> dict[str, list[LabelledImage]]:
    """Record the train and val items handed to the real loop."""
    fed: dict[str, list[LabelledImage]] = {}
    real_fit = recipes.fit

    def spy(detector: Any, train_set: Any, val_set: Any, config: Any, **kwargs: Any) -> Any:
        fed["train"] = list(train_set.items)
        fed["val"] = list(val_set.items) if val_set is not None else []
        return real_fit(detector, train_set, val_set, config, **kwargs)

    mp.setattr(recipes, "fit", spy)
    return fed


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    out = tmp_path_factory.mktemp("holdout") / "ck"
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        fed = _spy_fit(mp)
        trained = recipes.train_synthetic(
            out,
            n_train=64,
            n_val=32,
            n_test=80,
            sources=["deconv", "vae"],
            holdout_sources=["vae_f4_sharp"],
            config=TrainConfig(epochs=1, batch_size=16, lr=1e-3, progress=False),
        )
    assert trained is not None
    return trained, fed


def test_synthetic_holdout_never_feeds_the_held_out_generator(synthetic_run) -> None:
    trained, fed = synthetic_run
    classes = trained.manifest.classes
    assert classes == ["real", "deconv4_s2", "deconv3_x4", "vae_f4"]
    for split in ("train", "val"):
        fakes = [item for item in fed[split] if item.is_fake]
        assert fakes and {item.group for item in fakes} == {"deconv4_s2", "deconv3_x4", "vae_f4"}
        assert all(classes[item.source] == item.group for item in fakes)
    test_items = trained.test_scores.items
    held = [item for item in test_items if item.group == "vae_f4_sharp"]
    assert held and all(item.source == UNKNOWN_SOURCE for item in held)
    trained_pixels = {_digest(item) for split in ("train", "val") for item in fed[split]}
    assert not {_digest(item) for item in held} & trained_pixels
    test_reals = {_digest(item) for item in test_items if not item.is_fake}
    assert len(test_reals) >= 30 and not test_reals & trained_pixels
    info = trained.manifest.training
    assert info["holdout"]["held_out"] == ["vae_f4_sharp"]
    assert info["holdout"]["seen"] == ["deconv4_s2", "deconv3_x4", "vae_f4"]
    assert info["synthetic_sources"] == [
        "real",
        "deconv4_s2",
        "deconv3_x4",
        "vae_f4",
        "vae_f4_sharp",
    ]
    rows = trained.manifest.metrics["test"]["seen_unseen"]["rows"]
    assert {r["generator"]: r["status"] for r in rows} == {
        "deconv4_s2": "seen",
        "deconv3_x4": "seen",
        "vae_f4": "seen",
        "vae_f4_sharp": "unseen",
    }


def _tree(root: Path) -> Path:
    return zoo.write_tree(root, 10, size=64, splits={"train": 0.6, "val": 0.2, "test": 0.2})


def test_data_holdout_file_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a folder dataset: the files the loop reads never include a held-out folder."""
    tree = _tree(tmp_path / "tree")
    argv = ["train", "--data", str(tree), "--out", str(tmp_path / "ck"), "--epochs", "1"]
    argv += ["--batch-size", "8", "--preprocess", "resize", "--no-progress"]
    argv += ["--holdout-sources", "nearest_gan,bilinear_diffusion"]
    settings = train_cli.load_settings(build_parser().parse_args(argv))
    fed = _spy_fit(monkeypatch)
    trained = train_cli._train(settings)
    assert trained is not None
    held = {"nearest_gan", "bilinear_diffusion"}
    for split in ("train", "val"):
        folders = {item.path.parent.name for item in fed[split]}
        assert folders == {"real", "upconv_gan", "pixelshuffle_diffusion"}, split
        assert all(item.path.parts[-3] == split for item in fed[split])
    test_items = trained.test_scores.items
    moved = [item for item in test_items if item.path.parent.name in held]
    assert len(moved) == 20  # every file of both, from every split: none was trained on
    assert all(item.source == UNKNOWN_SOURCE and item.group in held for item in moved)
    trained_reals = {i.path for s in ("train", "val") for i in fed[s] if not i.is_fake}
    test_reals = {item.path for item in test_items if not item.is_fake}
    assert test_reals and not test_reals & trained_reals
    assert trained.manifest.classes == ["real", "upconv_gan", "pixelshuffle_diffusion"]
    summary = trained.manifest.metrics["test"]["seen_unseen"]
    assert summary["unseen"]["n_generators"] == 2 and summary["seen"]["n_generators"] == 2


def test_leaks_are_refused() -> None:
    plan = holdout.resolve(["b"], ["a", "b"])
    classes = plan.classes
    real = LabelledImage(source=0, path=Path("r1.png"))
    fake_b = LabelledImage(source=UNKNOWN_SOURCE, path=Path("b1.png"), group="b")
    fake_a = LabelledImage(source=1, path=Path("a1.png"))
    holdout.check_no_leak(plan, classes, {"train": [real, fake_a], "val": [], "test": [fake_b]})
    with pytest.raises(holdout.HoldoutError, match="'b' found in val"):
        holdout.check_no_leak(plan, classes, {"train": [real], "val": [fake_b], "test": []})
    with pytest.raises(holdout.HoldoutError, match="test real"):
        holdout.check_no_leak(plan, classes, {"train": [real], "val": [], "test": [real]})


def test_apply_reindexes_and_moves_held_out_fakes() -> None:
    plan = holdout.resolve(["b"], ["a", "b", "c"])
    old = ["real", "a", "b", "c"]
    splits = {
        "train": [LabelledImage(0, path=Path("r")), LabelledImage(2, path=Path("b")),
                  LabelledImage(3, path=Path("c"))],
        "val": [LabelledImage(2, path=Path("b2"))],
    }  # fmt: skip
    out = holdout.apply(plan, old, splits)
    assert [(i.path.name, i.source) for i in out["train"]] == [("r", 0), ("c", 2)]
    assert out["val"] == []
    assert [(i.path.name, i.source, i.group) for i in out["test"]] == [
        ("b", UNKNOWN_SOURCE, "b"),
        ("b2", UNKNOWN_SOURCE, "b"),
    ]


def test_report_separates_seen_from_unseen() -> None:
    """Rows tagged from the held-out list; each mean is the mean of that status's rows."""
    rng = np.random.default_rng(0)
    classes = ["real", "a", "b"]
    items, scores = [], []
    for name, source, shift in (("a", 1, 0.4), ("b", 2, 0.2), ("c", UNKNOWN_SOURCE, 0.05)):
        for _ in range(30):
            items.append(LabelledImage(source=source, group=name))
            scores.append(float(np.clip(rng.normal(0.5 + shift, 0.2), 0, 1)))
    for _ in range(40):
        items.append(LabelledImage(source=0))
        scores.append(float(np.clip(rng.normal(0.4, 0.2), 0, 1)))
    probs = torch.full((len(items), 3), 1 / 3)
    scored = Scored(items, torch.tensor(scores), probs)
    overall = summarize(scored, classes, 0.5)
    report = seen_unseen(overall["per_generator"], ["c"])
    status = {r["generator"]: r["status"] for r in report["rows"]}
    assert status == {"a": "seen", "b": "seen", "c": "unseen"}
    fake = np.asarray([i.is_fake for i in items])
    groups = np.asarray([i.group for i in items], dtype=object)
    values = np.asarray(scores)
    auc = {}
    for name in "abc":
        mask = (groups == name) | ~fake
        auc[name] = roc_auc(fake[mask], values[mask])
    rows = {r["generator"]: r for r in report["rows"]}
    assert all(rows[n]["auc"] == pytest.approx(auc[n]) for n in "abc")
    assert report["seen"]["mean_auc"] == pytest.approx((auc["a"] + auc["b"]) / 2)
    assert report["unseen"]["mean_auc"] == pytest.approx(auc["c"])
    assert report["seen"]["mean_balanced_accuracy"] == pytest.approx(
        np.mean([rows["a"]["balanced_accuracy"], rows["b"]["balanced_accuracy"]])
    )
    assert (report["seen"]["n_generators"], report["unseen"]["n_generators"]) == (2, 1)
    text = seen_unseen_table(report)
    assert "mean unseen" in text and "mean seen" in text
    assert [line.split()[1] for line in text.splitlines()[2:5]] == ["seen", "seen", "unseen"]


def test_cli_refuses_unknown_and_total_holdouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--synthetic", "--out", str(tmp_path / "x")]
    assert main([*base, "--holdout-sources", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--holdout-sources" in err and "'nope'" in err
    assert all(name in err for name in zoo.GENERATORS)  # the known sources are listed
    assert main([*base, "--holdout-sources", ",".join(zoo.GENERATORS)]) == 2
    assert "holds out every generator" in capsys.readouterr().err
    assert main([*base, "--synthetic-sources", "vae", "--holdout-sources", "vae"]) == 2
    assert "holds out every generator" in capsys.readouterr().err
    tree = _tree(tmp_path / "tree")
    argv = ["train", "--data", str(tree), "--out", str(tmp_path / "y"), "--holdout-sources"]
    assert main([*argv, "stylegan"]) == 2
    err = capsys.readouterr().err
    assert "--holdout-sources" in err and "'stylegan'" in err and "nearest_gan" in err
    assert main([*argv, ",".join(zoo.GENERATORS)]) == 2
    assert "every" in capsys.readouterr().err


def test_eval_reads_the_holdout_from_the_manifest(
    synthetic_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained, _ = synthetic_run
    report_file = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(trained.path), "--synthetic", "40", "--no-progress"]
    assert main([*argv, "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["data"]["sources"] == trained.manifest.training["synthetic_sources"]
    section = report["seen_unseen"]
    assert section["unseen_sources"] == ["vae_f4_sharp"]
    assert {r["generator"] for r in section["rows"] if r["status"] == "unseen"} == {"vae_f4_sharp"}
    assert "mean unseen" in capsys.readouterr().err
    assert main([*argv, "--holdout-sources", "vae_f4"]) == 2
    assert "classes of the checkpoint" in capsys.readouterr().err
    assert main([*argv, "--holdout-sources", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--holdout-sources" in err and "vae_f4_sharp" in err


def test_leave_one_out_reports_each_group_and_the_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--synthetic", "--out", str(tmp_path / "loo"), "--epochs", "1"]
    argv += ["--synthetic-images", "50", "--batch-size", "16", "--no-progress", "--threads", "1"]
    argv += ["--synthetic-sources", "deconv,spectral", "--leave-one-out", "family"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    groups = out["summary"]["groups"]
    assert set(groups) == {"deconv", "spectral"}
    assert {r["generator"] for r in groups["deconv"]["unseen_rows"]} == {
        "deconv4_s2",
        "deconv3_x4",
    }
    for name, run in out["runs"].items():
        assert (tmp_path / "loo" / f"holdout-{name}").is_dir()
        manifest = json.loads((Path(run["checkpoint"]) / "manifest.json").read_text())
        assert set(manifest["training"]["holdout"]["held_out"]) == set(run["held_out"])
    mean = np.mean([g["unseen"]["mean_auc"] for g in groups.values()])
    assert out["summary"]["mean"]["unseen"]["mean_auc"] == pytest.approx(mean)
    assert "held out deconv" in captured.err
