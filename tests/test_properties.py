"""Property-based tests (hypothesis) of the three places hostile input meets the worker:
the event parser, the SSRF guard and the offset tracker.

- parse_record: any key and value -> an Upload or an InvalidEventError, nothing else; the
  event id is at most 512 characters and free of control characters, whatever the message.
- AddressGuard: loopback, private, link-local, CGNAT, metadata, multicast and unspecified
  addresses are refused in every spelling (IPv4-mapped, NAT64, 6to4, decimal, hex) unless an
  allowed CIDR covers them; public addresses pass; metadata host names never pass.
- OffsetTracker: random consume / acknowledge / commit / rebalance orders never make an
  offset committable past a consumed offset whose output was never acknowledged, and a
  partition's commits never go backwards.
"""

from __future__ import annotations

import inspect
import json
import socket
import unicodedata
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clipguard.consumer.errors import InvalidEventError, SourceError
from clipguard.consumer.fetch import parse_target
from clipguard.consumer.netguard import METADATA_HOSTS, AddressGuard
from clipguard.consumer.offsets import OffsetTracker
from clipguard.consumer.records import RecordRef, Upload, parse_record

pytestmark = pytest.mark.faults

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_EVENT_ID = 512

# -- the event parser ---------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
event_ids = st.one_of(
    st.text(min_size=0, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=600),
    st.integers(),
    st.none(),
    st.sampled_from(["a\x00b", "line\nbreak", "\x1b[31mred", "tab\there", "\u2028", "ok-1"]),
)
b64_values = st.one_of(
    st.sampled_from(["", "aGVsbG8=", "not base64!", "iVBORw0KGgo="]),
    st.binary(max_size=60).map(lambda b: __import__("base64").b64encode(b).decode()),
    st.text(max_size=30),
)
events = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.one_of(st.integers(-2, 3), st.sampled_from(["1", True, None, 1.0])),
        "event_id": event_ids,
        "image_b64": st.one_of(b64_values, st.integers(), st.none()),
        "image_url": st.one_of(
            st.sampled_from(["http://example.com/a.jpg", "file:///etc/passwd", "", "ftp://x"]),
            st.text(max_size=30),
        ),
        "uploaded_at": st.one_of(
            st.sampled_from(["2026-11-23T10:00:00Z", "2026-11-23T10:00:00", "yesterday", ""]),
            st.integers(),
        ),
        "metadata": st.one_of(json_values, st.dictionaries(st.text(max_size=8), json_values)),
        "content_type": st.one_of(st.none(), st.text(max_size=20)),
        "extra": json_values,
    },
)
json_messages = st.one_of(
    events.map(lambda e: json.dumps(e).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    events.map(lambda e: json.dumps(e).encode("utf-16")),
    events.map(lambda e: b"\xef\xbb\xbf" + json.dumps(e).encode()),
)
values = st.one_of(
    st.none(),
    st.binary(max_size=200),
    json_messages,
    json_messages.map(lambda m: m[: max(1, len(m) // 2)]),  # truncated JSON
    st.sampled_from([b"{", b"[]", b"42", b"null", b"true", b'"x"', b" {}", b"\x89PNG\r\n\x1a\n"]),
)
keys = st.one_of(
    st.none(),
    st.binary(max_size=100),
    st.text(max_size=40).map(str.encode),
    st.text(alphabet=st.characters(max_codepoint=0x20), min_size=1, max_size=10).map(str.encode),
    st.integers(513, 3000).map(lambda n: b"k" * n),
)


def _control_free(text: str) -> bool:
    return not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


@FAST
@given(key=keys, value=values)
@example(key=None, value=b"[" * 100_000)  # nested 100k deep
@example(key=b"k", value=b'{"a":' * 100_000)
@example(key=b"x" * 4096, value=b"\x89PNG raw bytes")  # an oversized key on a raw message
@example(key=b"evil\x00\r\n\x1b[2J", value=b"\x89PNG raw bytes")
@example(key=b"id", value=json.dumps({"event_id": "ok", "image_b64": ""}).encode())
@example(key=b"id", value=b'"just a string"')
def test_parse_record_never_raises_anything_else(key: bytes | None, value: bytes | None) -> None:
    record = RecordRef("uploads", 0, 0, key, value)
    try:
        upload = parse_record(record)
    except InvalidEventError as exc:
        event_id = exc.event_id
        assert exc.reason and len(exc.reason) <= 64 and " " not in exc.reason, exc.reason
    else:
        assert isinstance(upload, Upload)
        event_id = upload.event_id
        has_bytes, has_url = upload.image_bytes is not None, upload.image_url is not None
        assert has_bytes != has_url, f"an Upload with image bytes {has_bytes}, URL {has_url}"
    if event_id is not None:
        assert isinstance(event_id, str)
        length, shown = len(event_id), repr(event_id[:60])
        assert 0 < length <= MAX_EVENT_ID, f"event id of {length} characters: {shown}"
        assert _control_free(event_id), f"event id with control characters: {shown}"


# -- the SSRF guard ------------------------------------------------------------------------------

REFUSED_V4 = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
]
METADATA_V4 = ["169.254.169.254", "169.254.170.2", "100.100.100.200", "168.63.129.16"]
REFUSED_V6 = ["::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "::/128", "fd00:ec2::254/128"]
PUBLIC_V4 = ["1.0.0.0/8", "8.0.0.0/8", "93.184.0.0/16", "151.101.0.0/16"]
PUBLIC_V6 = ["2606:4700::/32", "2a00:1450::/32", "2001:4860::/32"]

refused_v4 = st.one_of(
    st.sampled_from(REFUSED_V4).flatmap(lambda net: st.ip_addresses(network=net)),
    st.sampled_from(METADATA_V4).map(IPv4Address),
)
refused_v6 = st.sampled_from(REFUSED_V6).flatmap(lambda net: st.ip_addresses(network=net))
public_v4 = st.sampled_from(PUBLIC_V4).flatmap(lambda net: st.ip_addresses(network=net))
public_v6 = st.sampled_from(PUBLIC_V6).flatmap(lambda net: st.ip_addresses(network=net))


def _disguises(address: IPv4Address) -> list[IPv6Address]:
    """IPv6 forms that stand for an IPv4 address: mapped, NAT64 and 6to4."""
    value = int(address)
    return [
        IPv6Address(f"::ffff:{address}"),
        IPv6Address(int(ip_address("64:ff9b::")) | value),
        IPv6Address((0x2002 << 112) | (value << 80) | 1),
    ]


def _spellings(address: IPv4Address) -> list[str]:
    """How a URL may spell an IPv4 host (all resolved locally, no DNS)."""
    a, b, c, d = address.packed
    return [str(address), str(int(address)), hex(int(address)), f"{a}.{(b << 16) | (c << 8) | d}"]


@FAST
@given(address=st.one_of(refused_v4, refused_v6))
def test_guard_refuses_internal_addresses(address: IPv4Address | IPv6Address) -> None:
    guard = AddressGuard()
    assert guard.refusal(address) is not None
    if isinstance(address, IPv4Address):
        for disguised in _disguises(address):
            assert guard.refusal(disguised) is not None, disguised


@FAST
@given(address=st.one_of(refused_v4, refused_v6), data=st.data())
def test_allowed_cidrs_readmit_only_what_they_cover(
    address: IPv4Address | IPv6Address, data: st.DataObject
) -> None:
    prefix = data.draw(st.integers(address.max_prefixlen - 8, address.max_prefixlen))
    network = ip_network(f"{address}/{prefix}", strict=False)
    guard = AddressGuard(allow_cidrs=[str(network)])
    assert guard.refusal(address) is None
    # Anything outside the allowed network stays refused.
    other = data.draw(st.one_of(refused_v4, refused_v6))
    if other not in network and not (
        isinstance(other, IPv4Address) and isinstance(address, IPv4Address) and other == address
    ):
        assert guard.refusal(other) is not None, (other, network)


@FAST
@given(address=st.one_of(public_v4, public_v6))
def test_guard_lets_public_addresses_through(address: IPv4Address | IPv6Address) -> None:
    assert AddressGuard().refusal(address) is None


@FAST
@given(address=refused_v4, which=st.integers(0, 3))
def test_url_spellings_of_internal_hosts_are_refused(address: IPv4Address, which: int) -> None:
    guard = AddressGuard()
    spelled = _spellings(address)[which]
    target = parse_target(f"http://{spelled}/image.jpg")
    with pytest.raises(SourceError) as refused:
        guard.resolve(target.host, target.port)
    assert refused.value.reason == "ssrf_refused", (spelled, refused.value)


@FAST
@given(
    answers=st.lists(
        st.one_of(refused_v4, refused_v6, public_v4, public_v6), min_size=1, max_size=6
    ),
    allow=st.lists(st.sampled_from(["127.0.0.1/32", "10.0.0.0/8", "fc00::/7"]), max_size=2),
)
def test_resolve_returns_exactly_the_allowed_answers(
    answers: list[IPv4Address | IPv6Address], allow: list[str]
) -> None:
    def resolver(host: str, port: int, **_: object) -> list[tuple]:
        return [
            (
                socket.AF_INET if a.version == 4 else socket.AF_INET6,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (str(a), port) if a.version == 4 else (str(a), port, 0, 0),
            )
            for a in answers
        ]

    guard = AddressGuard(allow_cidrs=allow, resolver=resolver)
    networks = [ip_network(n) for n in allow]
    expected = []
    for a in answers:
        covered = any(a.version == n.version and a in n for n in networks)
        if (covered or AddressGuard().refusal(a) is None) and a not in expected:
            expected.append(a)
    if expected:
        assert [r.address for r in guard.resolve("images.example", 443)] == expected
    else:
        with pytest.raises(SourceError) as refused:
            guard.resolve("images.example", 443)
        assert refused.value.reason == "ssrf_refused"


@pytest.mark.parametrize("host", sorted(METADATA_HOSTS))
def test_metadata_names_stay_refused_even_when_their_range_is_allowed(host: str) -> None:
    guard = AddressGuard(allow_cidrs=["169.254.0.0/16", "0.0.0.0/0"])
    with pytest.raises(SourceError) as refused:
        guard.check_host(host)
    assert refused.value.reason == "ssrf_refused"


# -- the offset tracker --------------------------------------------------------------------------

PARTITIONS = [("uploads", 0), ("uploads", 1)]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("consume"), st.integers(0, 1), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("ack"), st.integers(0, 1), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("stale_ack"), st.integers(0, 1), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("commit"), st.integers(0, 1), st.integers(0, 0), st.booleans()),
        st.tuples(st.just("rebalance"), st.integers(0, 1), st.integers(0, 5), st.booleans()),
    ),
    max_size=60,
)


def _is_marker(tp: tuple[str, int], offset: int) -> bool:
    """The second partition is written by transactions: every third offset is a commit
    marker, the same on every read (a marker is a property of the log, not of a read)."""
    return tp == PARTITIONS[1] and offset % 3 == 2


class _Model:
    """What the broker and the outputs say, next to what the tracker says."""

    def __init__(self, tracker: OffsetTracker) -> None:
        self.tracker = tracker
        self.takes_epoch = "epoch" in inspect.signature(tracker.acknowledged).parameters
        self.broker_committed = {tp: 0 for tp in PARTITIONS}
        self.position = {tp: 0 for tp in PARTITIONS}
        self.records: dict[tuple[str, int], set[int]] = {tp: set() for tp in PARTITIONS}
        self.output_acked: dict[tuple[str, int], set[int]] = {tp: set() for tp in PARTITIONS}
        self.inflight: dict[tuple[str, int], list[tuple[int, object]]] = {
            tp: [] for tp in PARTITIONS
        }
        self.stale: dict[tuple[str, int], list[tuple[int, object]]] = {tp: [] for tp in PARTITIONS}
        self.commits = 0

    def ack(self, tp: tuple[str, int], offset: int, epoch: object) -> None:
        if self.takes_epoch and epoch is not None:
            self.tracker.acknowledged(tp, offset, epoch)
        else:
            self.tracker.acknowledged(tp, offset)
        self.output_acked[tp].add(offset)

    def step(self, op: str, which: int, n: int, flag: bool) -> None:
        tp = PARTITIONS[which]
        if op == "consume":
            for _ in range(n):
                offset = self.position[tp]
                if _is_marker(tp, offset):  # a transaction marker: an offset with no record
                    offset += 1
                self.records[tp].add(offset)
                epoch = self.tracker.consumed(tp, offset)
                self.inflight[tp].append((offset, epoch))
                self.position[tp] = offset + 1
        elif op == "ack" and self.inflight[tp]:
            offset, epoch = self.inflight[tp].pop(n % len(self.inflight[tp]))
            self.ack(tp, offset, epoch)
        elif op == "stale_ack" and self.stale[tp]:
            offset, epoch = self.stale[tp].pop(n % len(self.stale[tp]))
            self.ack(tp, offset, epoch)
        elif op == "commit":
            self.commit(succeed=flag)
        elif op == "rebalance":
            self.tracker.forget([tp])
            self.stale[tp] += self.inflight[tp]  # their outputs may still be acknowledged later
            self.inflight[tp] = []
            if n and flag:
                # Meanwhile another member owned it, judged n more records and committed them.
                start = self.broker_committed[tp]
                for offset in range(start, max(start, self.position[tp]) + n):
                    if not _is_marker(tp, offset):
                        self.records[tp].add(offset)
                        self.output_acked[tp].add(offset)
                self.broker_committed[tp] = max(start, self.position[tp]) + n
            self.position[tp] = self.broker_committed[tp]  # resume where the group committed

    def commit(self, succeed: bool) -> None:
        positions = self.tracker.committable()
        for tp, position in positions.items():
            assert position >= self.broker_committed[tp], (
                f"{tp}: commit {position} goes back from {self.broker_committed[tp]}"
            )
            assert position <= self.position[tp], f"{tp}: {position} past what was consumed"
            unacknowledged = {
                o for o in self.records[tp] if o < position and o not in self.output_acked[tp]
            }
            assert not unacknowledged, f"{tp}: commit {position} passes {sorted(unacknowledged)}"
        if succeed and positions:
            self.tracker.committed(positions)
            self.broker_committed.update(positions)
            self.commits += 1


def _run(steps: list[tuple]) -> _Model:
    model = _Model(OffsetTracker())
    for step in steps:
        model.step(*step)
    # Finally everything in flight is acknowledged and committed.
    for tp in PARTITIONS:
        while model.inflight[tp]:
            offset, epoch = model.inflight[tp].pop()
            model.ack(tp, offset, epoch)
    for _ in range(200):  # commit rounds (the consumer loop commits on every poll)
        before = dict(model.broker_committed)
        model.commit(succeed=True)
        if model.broker_committed == before:
            break
    return model


@settings(max_examples=200, deadline=None)
@given(steps=ops)
def test_offset_tracker_never_commits_unacknowledged_offsets(steps: list[tuple]) -> None:
    """Safety: every commit is checked inside the model (never past an unacknowledged
    consumed offset, never backwards, never past what was consumed)."""
    _run(steps)


@settings(max_examples=200, deadline=None)
@given(steps=ops)
@example(
    steps=[
        ("consume", 0, 2, False),
        ("ack", 0, 0, False),
        ("ack", 0, 0, False),
        ("commit", 0, 0, False),
    ]
)  # the broker refused the last commit
def test_offset_tracker_commits_reach_the_end_after_failed_commits(steps: list[tuple]) -> None:
    """Liveness: once everything consumed is acknowledged, the commits reach the consumed
    end, even when earlier commits failed (the broker was away) or partitions moved."""
    model = _run(steps)
    for tp in PARTITIONS:
        assert model.broker_committed[tp] == model.position[tp], (
            f"{tp}: committed {model.broker_committed[tp]}, consumed up to {model.position[tp]}"
        )
