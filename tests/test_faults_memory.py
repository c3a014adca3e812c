"""A burst of 12-megapixel JPEGs, 20x the in-flight cap (issue 10 suite; DESIGN.md
"Performance", item 5): the serve process's peak RSS stays within the bound the cap implies.

Bound = idle RSS after warm-up (model, Python, torch, threads: measured, not guessed)
      + cap x per-event bytes (the event as consumed, base64 JSON; the JPEG bytes; the decoded
        12 MP RGB image; the preprocessed tensor)
      + the Kafka client's fetch buffers (two fetch responses of ``fetch_max_bytes``)
      + a fixed allowance for allocator slack and the publisher's buffers.
The burst is asserted against that bound, never against a time.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from faults import Fleet, Outputs, new_topics, producer
from kafka_fixture import EmbeddedBroker
from PIL import Image

from clipguard.cli.produce import upload_event

pytestmark = [pytest.mark.broker, pytest.mark.faults, pytest.mark.slow]

MIB = 1 << 20
CAP, BATCH = 8, 4
BURST = 20 * CAP
WIDTH, HEIGHT = 4000, 3000  # 12 megapixels, a phone photo
MODEL_INPUT = 3 * 224 * 224 * 4  # float32 tensor; clipguard-tiny is smaller still
#: The worker's consumer fetch cap: max(8 MiB, 4 x max_image_bytes (20 MiB default)).
FETCH_MAX_BYTES = 80 * MIB
FIXED_ALLOWANCE = 256 * MIB


@pytest.fixture(scope="module")
def photo() -> bytes:
    """One 12 MP JPEG with a gradient and noise (about 3 MB), made once and reused."""
    rng = np.random.default_rng(0)
    y = np.linspace(0, 255, HEIGHT, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :]
    pixels = np.empty((HEIGHT, WIDTH, 3), np.float32)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = (x + y) / 2, y, x
    pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def test_burst_of_12mp_jpegs_stays_within_the_memory_bound(
    tiny_checkpoint: Path, tmp_path: Path, photo: bytes
) -> None:
    with EmbeddedBroker() as broker:  # its own: the burst is ~650 MB held in broker memory
        bootstrap = broker.bootstrap_servers
        topics = new_topics(bootstrap, partitions=2, prefix="burst")
        with (
            Fleet(
                tiny_checkpoint,
                bootstrap,
                topics,
                tmp_path,
                max_inflight=CAP,
                max_batch_size=BATCH,
            ) as fleet,
            Outputs(bootstrap, topics) as out,
        ):
            worker = fleet.spawn("burst")
            worker.wait_ready()
            time.sleep(1.0)  # let the warm-up's garbage go before measuring the idle RSS
            idle = worker.memory_kib()
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set() and worker.alive():
                    rss = worker.memory_kib().get("VmRSS")
                    if rss:
                        samples.append(rss)
                    stop.wait(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            client = producer(bootstrap, batch_size=1 << 20)
            event_bytes = 0
            futures = []
            for i in range(BURST):
                value = upload_event(photo, f"photo-{i}")
                event_bytes = max(event_bytes, len(value))
                futures.append(client.send(topics.input, key=f"photo-{i}".encode(), value=value))
            client.flush(timeout=120)
            placed = [f.get(timeout=60) for f in futures]
            client.close(timeout=5)
            expected = {(m.partition, m.offset) for m in placed}
            started = time.monotonic()
            missing = out.wait_for(expected, timeout=240, alive=worker.alive)
            took = time.monotonic() - started
            stop.set()
            sampler.join(timeout=5)
            final = worker.memory_kib()
            tally = out.tally(expected)
            alive = worker.alive()

    per_event = event_bytes + len(photo) + WIDTH * HEIGHT * 3 + MODEL_INPUT
    idle_bytes = idle["VmRSS"] * 1024
    bound = idle_bytes + CAP * per_event + 2 * FETCH_MAX_BYTES + FIXED_ALLOWANCE
    peak = max([final.get("VmHWM", 0), *samples]) * 1024
    peak_sampled = max(samples, default=0) * 1024
    print(
        f"[12MP burst] {BURST} events of {event_bytes / MIB:.1f} MiB ({len(photo) / MIB:.1f} MiB "
        f"JPEG, {WIDTH}x{HEIGHT}), cap {CAP}, batch {BATCH}; judged in {took:.1f}s\n"
        f"  idle RSS after warm-up {idle_bytes / MIB:.0f} MiB (warm-up peak "
        f"{idle.get('VmHWM', 0) / 1024:.0f} MiB)\n"
        f"  per event {per_event / MIB:.1f} MiB x cap {CAP} = {CAP * per_event / MIB:.0f} MiB; "
        f"fetch buffers {2 * FETCH_MAX_BYTES / MIB:.0f} MiB; allowance "
        f"{FIXED_ALLOWANCE / MIB:.0f} MiB\n"
        f"  peak RSS {peak / MIB:.0f} MiB (sampled {peak_sampled / MIB:.0f} MiB, VmHWM "
        f"{final.get('VmHWM', 0) / 1024:.0f} MiB) against the bound {bound / MIB:.0f} MiB; "
        f"growth over idle {(peak - idle_bytes) / MIB:.0f} MiB"
    )
    print(tally.line("12MP burst"))
    assert alive, f"worker stopped with {worker.returncode}:\n{worker.log_tail()}"
    assert not missing and tally.lost == [], f"lost {tally.lost[:10]}"
    assert peak <= bound, f"peak RSS {peak / MIB:.0f} MiB above the bound {bound / MIB:.0f} MiB"
