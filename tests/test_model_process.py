"""The model in a process of its own (``model_process``): same predictions, same verdicts,
a child that dies is replaced, a parent that dies takes its child along."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import image_bytes
from streams import fresh_topics, produce, read_outputs, running_worker, worker_settings

from clipguard.cli.produce import upload_event
from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.engine import EngineConfig, InferenceEngine
from clipguard.detector.preprocess import preprocess_views
from clipguard.detector.process_engine import ModelProcessError, ProcessEngine

CONFIG = EngineConfig(threads=1, max_batch_size=4, warmup_batches=1)


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path):
    engine = ProcessEngine(
        functools.partial(InferenceEngine.from_checkpoint, tiny_checkpoint, CONFIG)
    )
    yield engine
    engine.close()


def _batch(seed: int) -> list[torch.Tensor]:
    """Events with one view and with three, as the decode stage hands them on."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(views, 3, 64, 64, generator=generator) for views in (1, 3, 1, 2, 1)]


def test_predictions_equal_the_in_process_engine(tiny_checkpoint: Path, served: ProcessEngine):
    local = InferenceEngine.from_checkpoint(tiny_checkpoint, CONFIG)
    assert served.pid != os.getpid()
    assert served.manifest == local.manifest
    assert served.preprocess == local.preprocess
    assert (served.dtype, served.dtype_reason) == (local.dtype, local.dtype_reason)
    for seed in range(3):
        pixels = _batch(seed) * (seed + 1)  # 8, 16, 24 views: the shared buffer grows
        assert served.predict_tensors(pixels) == local.predict_tensors(pixels)
    assert served.predict_tensors([]) == []


def test_a_killed_child_fails_its_batch_and_is_replaced(served: ProcessEngine):
    before = served.predict_tensors(_batch(7))
    old_pid = served.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while served.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not served.alive()
    restarts = served.restarts
    assert served.predict_tensors(_batch(7)) == before  # a fresh child, the same numbers
    assert served.restarts == restarts + 1
    assert served.pid not in (None, old_pid)


def test_a_child_that_cannot_load_says_why(tmp_path: Path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ModelProcessError, match=r"did not start.*no-such-checkpoint"):
        ProcessEngine(functools.partial(InferenceEngine.from_checkpoint, missing, CONFIG))


def test_the_child_dies_with_its_parent(tiny_checkpoint: Path, tmp_path: Path):
    """A SIGKILLed worker must not leave a model process holding the weights."""
    script = textwrap.dedent(
        f"""
        import functools, sys, time
        from clipguard.detector.engine import EngineConfig, InferenceEngine
        from clipguard.detector.process_engine import ProcessEngine
        if __name__ == "__main__":
            config = EngineConfig(threads=1, max_batch_size=2, warmup_batches=0)
            engine = ProcessEngine(
                functools.partial(InferenceEngine.from_checkpoint, {str(tiny_checkpoint)!r}, config)
            )
            print(engine.pid, flush=True)
            time.sleep(120)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        os.kill(child_pid, 0)  # alive
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _exists(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _exists(child_pid), "the model process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"  # a zombie is gone


@pytest.mark.broker
def test_worker_with_model_process_judges_every_event(kafka_bootstrap: str, tiny_checkpoint: Path):
    topics = fresh_topics(kafka_bootstrap)
    colours = [(10 * i, 255 - 10 * i, 40) for i in range(12)]
    events = [
        (f"k{i}".encode(), upload_event(image_bytes(color=c), f"mp-{i}"))
        for i, c in enumerate(colours)
    ]
    events.append((b"bad", b"{not json"))
    placed = produce(kafka_bootstrap, topics.input, events)
    settings = worker_settings(kafka_bootstrap, tiny_checkpoint, topics, model_process=True)
    with running_worker(settings) as worker:
        assert isinstance(worker.engine, ProcessEngine)
        out = read_outputs(kafka_bootstrap, topics, set(placed))
    assert set(out.covered(topics.input)) == set(placed)  # at least once: repeats may occur
    judged = {v.event_id for v in out.verdicts if v.error is None}
    assert judged == {f"mp-{i}" for i in range(12)}
    assert {h["clipguard.error.reason"] for _, _, h in out.dead_letters} == {"bad_json"}
    local = InferenceEngine.from_checkpoint(tiny_checkpoint, CONFIG)
    by_id = {v.event_id: v for v in out.verdicts}
    for i, colour in enumerate(colours):
        image = decode_image(image_bytes(color=colour), DecodeLimits())
        expected = local.predict_tensors([preprocess_views(image, local.preprocess)])[0]
        assert by_id[f"mp-{i}"].ai_score == round(expected.ai_score, 6)
