"""``--log-format json``: one JSON object per log record, no image bytes, no secrets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from streams import fresh_topics

from clipguard.cli.logjson import MAX_MESSAGE_CHARS, JsonFormatter

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def format_one(msg: str, *args: object, **extra: object) -> dict:
    record = logging.LogRecord("clipguard.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    return json.loads(line)


def test_fields_and_record_identity() -> None:
    out = format_one(
        "unexpected error on %s/%d@%d", "uploads", 2, 41,
        topic="uploads", partition=2, offset=41, event_id="e-1", user_secret="nope",
    )  # fmt: skip
    assert out["level"] == "WARNING" and out["logger"] == "clipguard.test"
    assert out["message"] == "unexpected error on uploads/2@41"
    assert out["ts"].endswith("Z") and "T" in out["ts"]
    assert (out["topic"], out["partition"], out["offset"], out["event_id"]) == (
        "uploads", 2, 41, "e-1",
    )  # fmt: skip
    assert "user_secret" not in out  # only the record fields are taken from extra=


def test_no_image_bytes_and_bounded_messages() -> None:
    out = format_one("got %s and %s", PNG, bytearray(PNG), topic=PNG)
    assert out["message"] == f"got <{len(PNG)} bytes> and <{len(PNG)} bytes>"
    assert out["topic"] == f"<{len(PNG)} bytes>"
    assert "PNG" not in json.dumps(out)
    assert format_one(PNG)["message"] == f"<{len(PNG)} bytes>"  # bytes as the message itself
    long = format_one("x" * (MAX_MESSAGE_CHARS * 2))["message"]
    assert len(long) < MAX_MESSAGE_CHARS + 40


def test_exceptions_are_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "clipguard", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    out = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in out["exception"]


def ready(seen: list[str]) -> bool:
    """True once the logged metrics endpoint answers /readyz with 200."""
    found = [re.search(r"metrics on (http://\S+)/metrics", line) for line in seen]
    urls = [m.group(1) for m in found if m]
    if not urls:
        return False
    try:
        with urllib.request.urlopen(urls[0] + "/readyz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.broker
def test_serve_logs_json_lines_without_secrets(tiny_checkpoint: Path, kafka_bootstrap: str) -> None:
    """The real command against the real broker: start, serve, SIGTERM, stop; every line JSON."""
    topics = fresh_topics(kafka_bootstrap, partitions=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPGUARD_")}
    env.update(HF_HUB_OFFLINE="1", CLIPGUARD_LOG_FORMAT="json")
    secret = "hunter2-do-not-log"
    argv = [
        sys.executable, "-m", "clipguard.cli", "serve",
        "--checkpoint", str(tiny_checkpoint), "--bootstrap-servers", kafka_bootstrap,
        "--input-topic", topics.input, "--output-topic", topics.output,
        "--dlq-topic", topics.dlq, "--group-id", topics.group,
        "--session-timeout-ms", "6000", "--heartbeat-interval-ms", "1000",
        "--metrics-port", "0", "--metrics-host", "127.0.0.1",
        "--torch-threads", "1", "--decode-workers", "1",
        "--sasl-username", "svc", "--sasl-password", secret,  # set, unused on PLAINTEXT
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and not ready(seen):  # warm, partitions assigned
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
            assert proc.poll() is None, seen
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get_nowait())
    seen = [line for line in seen if line.strip()]
    logged = [json.loads(line) for line in seen]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in logged)
    messages = [line["message"] for line in logged]
    for expected in ("metrics on", "serving", "draining", "stopped cleanly"):
        assert any(expected in m for m in messages), (expected, messages)
    assert secret not in "\n".join(seen)
