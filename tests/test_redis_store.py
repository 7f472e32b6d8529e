"""RedisStore on its own, against a real redis-server each test starts on a free port."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from prefetch_ingest import Progress, RemoteLoadError, Status, StoreError
from prefetch_ingest._redis_keys import digest_of, encode_key, names_for
from prefetch_ingest.redis import CodecError, JSONCodec, RedisStore

from .redis_server import RedisServer, redis_server_fixture

SRC = Path(__file__).resolve().parent.parent / "src"

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

redis_server = redis_server_fixture()
durable_redis = redis_server_fixture(persistent=True, name="durable_redis")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore is asyncio only


@contextlib.asynccontextmanager
async def opened(
    store: RedisStore, *, ttl: float | None = None, failure_ttl: float = 0.0
) -> AsyncIterator[RedisStore]:
    await store.open(ttl=ttl, failure_ttl=failure_ttl)
    try:
        yield store
    finally:
        await store.aclose()


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll a Redis condition (bounded)."""
    with anyio.fail_after(timeout):
        while True:
            if await condition():
                return
            await anyio.sleep(0.01)  # the condition lives in Redis: nothing to wait on here


def value_of(v: Any) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        return v

    return run


def lease_key(prefix: str, key: Any) -> str:
    return names_for(prefix, key).lease


def record_key(prefix: str, key: Any) -> str:
    return names_for(prefix, key).record


async def exists(server: RedisServer, name: str) -> bool:
    return bool(server.command("EXISTS", name))


async def listening(store: RedisStore) -> bool:
    """Some load or wait_change of this store is waiting for a notification."""
    return bool(store._redis._signals)


async def not_(condition: Awaitable[bool]) -> bool:
    return not await condition


MEASURING = {"info", "hello", "client|setinfo"}
"""Commands of the measuring client itself (its connection set-up and INFO)."""


# -- construction --------------------------------------------------------------


async def test_constructor_rejects_bad_arguments(redis_server: RedisServer) -> None:
    """Misuse is a clear error at construction, naming the argument."""
    with pytest.raises(ValueError, match="url_or_client"):
        RedisStore("http://localhost")
    with pytest.raises(TypeError, match="url_or_client"):
        RedisStore(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(redis_server.url, prefix="")
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(redis_server.url, prefix="a{b}")
    with pytest.raises(ValueError, match="lease"):
        RedisStore(redis_server.url, lease=0)
    with pytest.raises(ValueError, match="lease"):
        RedisStore(redis_server.url, lease=float("nan"))
    with pytest.raises(ValueError, match="fallback"):
        RedisStore(redis_server.url, fallback="memory")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="codec"):
        RedisStore(redis_server.url, codec=pickle)  # type: ignore[arg-type]
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client)
    finally:
        await client.aclose()


async def test_repr_hides_the_password() -> None:
    store = RedisStore("redis://user:s3cret@localhost:6390/2")
    assert "s3cret" not in repr(store)
    assert "***" in repr(store)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_to_run_under_trio(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    with pytest.raises(RuntimeError, match="asyncio only"):
        await store.open(ttl=None, failure_ttl=0.0)


# -- keys ----------------------------------------------------------------------


def test_key_encoding_is_unambiguous() -> None:
    """Keys that differ in Python never share an encoding; equal keys always do."""
    distinct: list[Any] = [
        ("a:b", "c"),
        ("a", "b:c"),
        "a:b:c",
        ("a", "b", "c"),
        (("a",), "b"),
        ("a", ("b",)),
        "",
        (),
        ((),),
        None,
        "None",
        0.5,
        "0.5",
        1,
        "1",
        (1,),
        "*",
        "{x}",
        "a b",
        "a\nb",
        "a\x00b",
        "é",
        "e\u0301",
        float("inf"),
        -1,
        2**80,
        "\ud800",
    ]
    encodings = [encode_key(k) for k in distinct]
    assert len(set(encodings)) == len(distinct)
    assert len({digest_of(k) for k in distinct}) == len(distinct)
    # equal in Python (as dict keys) -> one key
    assert digest_of(1) == digest_of(1.0) == digest_of(True)
    assert digest_of(0) == digest_of(-0.0) == digest_of(False)
    assert digest_of((1, "a")) == digest_of((1.0, "a"))


@pytest.mark.parametrize(
    "bad", [[1], {"a": 1}, {1}, object(), b"bytes", ("ok", [1]), (1, (2, {3}))]
)
def test_unsupported_keys_are_type_errors(bad: Any) -> None:
    store = RedisStore("redis://127.0.0.1:1")
    with pytest.raises(TypeError, match="key"):
        store.check_key(bad)


def test_deeply_nested_key_is_a_type_error() -> None:
    key: Any = "x"
    for _ in range(10_000):
        key = (key,)
    with pytest.raises(TypeError, match="nested"):
        RedisStore("redis://127.0.0.1:1").check_key(key)


HOSTILE_KEYS: list[Any] = [
    ("a:b", "c"),
    ("a", "b:c"),
    "*",
    "{x}",
    "}{",
    "a b",
    "line\nbreak",
    "nul\x00byte",
    "ünïcødé ✓",
    "p1:{deadbeef}:r",
    ("p1", "p2"),
    "x\n[CRITICAL] forged",
]


async def test_hostile_keys_in_two_prefixes_never_collide(redis_server: RedisServer) -> None:
    """Every (prefix, key) pair gets its own value; all Redis names stay in their namespace."""
    async with (
        opened(RedisStore(redis_server.url, prefix="p1")) as one,
        opened(RedisStore(redis_server.url, prefix="p1:p2")) as two,
    ):
        for i, key in enumerate(HOSTILE_KEYS):
            assert (
                await one.load(key, value_of(["p1", i]), background=False, force=False)
            ).ran_here
            assert (
                await two.load(key, value_of(["p2", i]), background=False, force=False)
            ).ran_here
        for i, key in enumerate(HOSTILE_KEYS):
            entry_one = await one.lookup(key)
            entry_two = await two.lookup(key)
            assert entry_one is not None and entry_two is not None
            assert entry_one.value == ["p1", i]
            assert entry_two.value == ["p2", i]
    names = [n.decode() for n in redis_server.command("KEYS", "*")]
    assert len(names) == 2 * len(HOSTILE_KEYS)
    for name in names:
        prefix, rest = name.split(":{", 1)
        assert prefix in ("p1", "p1:p2")
        tag, suffix = rest.split("}", 1)
        assert len(tag) == 32 and suffix == ":r"  # one hash slot per entry, fixed shape


async def test_a_one_megabyte_key_is_hashed(redis_server: RedisServer) -> None:
    """A 1 MB key is accepted: Redis sees a fixed 32-character digest, never the key."""
    key = ("big", "k" * 1_000_000)
    async with opened(RedisStore(redis_server.url)) as store:
        store.check_key(key)
        outcome = await store.load(key, value_of("big value"), background=False, force=False)
        assert outcome.ran_here
        entry = await store.lookup(key)
        assert entry is not None and entry.value == "big value"
        assert await store.lookup(("big", "k" * 999_999 + "j")) is None
    (name,) = redis_server.command("KEYS", "*")
    assert len(name) < 64


# -- loads ---------------------------------------------------------------------


async def test_cold_load_then_hit_and_status(redis_server: RedisServer) -> None:
    async with opened(RedisStore(redis_server.url), ttl=60.0) as store:
        assert await store.lookup("k") is None
        outcome = await store.load("k", value_of({"n": 1}), background=True, force=False)
        assert outcome.ran_here and outcome.value == {"n": 1}
        entry = await store.lookup("k")
        assert entry is not None
        assert entry.status is Status.COMPLETED
        assert entry.value == {"n": 1}
        assert entry.background is True
        assert entry.started_at is not None and entry.completed_at is not None
        assert entry.expires_at is not None
        assert entry.started_at <= entry.completed_at < entry.expires_at
        again = await store.load("k", value_of("other"), background=False, force=False)
        assert not again.ran_here and again.value == {"n": 1}
        forced = await store.load("k", value_of("new"), background=False, force=True)
        assert forced.ran_here and forced.value == "new"
    ttl_ms = redis_server.command("PTTL", record_key("prefetch_ingest", "k"))
    assert 0 < ttl_ms <= 60_000  # a Redis-side expiry
    assert not await exists(redis_server, lease_key("prefetch_ingest", "k"))


async def test_ttl_none_keeps_the_result_without_expiry(redis_server: RedisServer) -> None:
    async with opened(RedisStore(redis_server.url), ttl=None) as store:
        await store.load("k", value_of(1), background=False, force=False)
        entry = await store.lookup("k")
        assert entry is not None and entry.expires_at is None
    assert redis_server.command("PTTL", record_key("prefetch_ingest", "k")) == -1


async def test_a_hit_is_one_command_and_a_cold_load_two_round_trips(
    redis_server: RedisServer,
) -> None:
    """INFO commandstats deltas: hit = 1 MGET; cold single-owner load = MGET + 2 EVALSHA."""
    async with opened(RedisStore(redis_server.url), ttl=60.0) as store:
        # warm up (loads the scripts once)
        await store.lookup("warm")
        await store.load("warm", value_of(0), background=False, force=False)

        def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
            return {
                k: after.get(k, 0) - before.get(k, 0)
                for k in after
                if after.get(k, 0) != before.get(k, 0) and k not in MEASURING
            }

        before = redis_server.command_calls()
        assert await store.lookup("cold") is None  # the engine's lookup
        await store.load("cold", value_of({"x": 1}), background=False, force=False)
        cold = delta(before, redis_server.command_calls())
        # round trips from the client: the lookup's MGET, then two scripts
        assert cold.pop("mget") == 1
        assert cold.pop("evalsha") == 2
        # run by those scripts, inside Redis: acquire GET (outcome) GET (lease) GET (cancel
        # note) TIME SET PUBLISH, complete GET (lease) GET (outcome, for its fence) DEL SET
        # PUBLISH
        assert cold == {"get": 5, "time": 1, "set": 2, "del": 1, "publish": 2}

        before = redis_server.command_calls()
        entry = await store.lookup("cold")
        hit = delta(before, redis_server.command_calls())
        assert entry is not None and entry.value == {"x": 1}
        assert hit == {"mget": 1}


async def test_failure_is_reraised_as_is_and_recorded_like_a_value(
    redis_server: RedisServer,
) -> None:
    """v2: a failure is recorded with the store's ttl (as a value is), by type and message;
    whether ``get`` re-raises it is the engine's decision (failure_ttl against the record's
    completed_at), so the store's own load of a key whose last run failed runs it again."""

    class Boom(Exception):
        pass

    async def fail() -> Any:
        raise Boom("no luck")

    async with (
        opened(RedisStore(redis_server.url), ttl=60.0, failure_ttl=30.0) as store,
        opened(RedisStore(redis_server.url)) as other,
    ):
        with pytest.raises(Boom, match="no luck"):
            await store.load("k", fail, background=False, force=False)
        entry = await other.lookup("k")
        assert entry is not None
        assert entry.status is Status.FAILED
        assert entry.error == "Boom: no luck"
        assert (entry.error_type, entry.error_message) == ("Boom", "no luck")
        assert entry.completed_at is not None and entry.expires_at is not None
        assert entry.completed_at < entry.expires_at
        assert 0 < redis_server.command("PTTL", record_key("prefetch_ingest", "k")) <= 60_000
        outcome = await other.load("k", value_of(1), background=False, force=False)
        assert outcome.ran_here and outcome.value == 1
        entry = await store.lookup("k")
        assert entry is not None and entry.status is Status.COMPLETED and entry.value == 1


async def test_failure_with_failure_ttl_zero_is_recorded_and_the_next_load_runs(
    redis_server: RedisServer,
) -> None:
    """v2: failure_ttl=0 does not keep a failure out of the store (it is kept like a value,
    here with no expiry); the next load runs at once all the same."""

    async def fail() -> Any:
        raise ValueError("bad")

    async with opened(RedisStore(redis_server.url), failure_ttl=0.0) as store:
        with pytest.raises(ValueError, match="bad"):
            await store.load("k", fail, background=False, force=False)
        entry = await store.lookup("k")
        assert entry is not None and entry.status is Status.FAILED
        assert entry.error == "ValueError: bad" and entry.expires_at is None
        assert redis_server.command("PTTL", record_key("prefetch_ingest", "k")) == -1
        outcome = await store.load("k", value_of(2), background=False, force=False)
        assert outcome.ran_here and outcome.value == 2


async def test_a_failed_refresh_keeps_the_completed_value(redis_server: RedisServer) -> None:
    async def fail() -> Any:
        raise ValueError("refresh failed")

    async with opened(RedisStore(redis_server.url), failure_ttl=30.0) as store:
        await store.load("k", value_of("old"), background=False, force=False)
        with pytest.raises(ValueError):
            await store.load("k", fail, background=True, force=True)
        entry = await store.lookup("k")
        assert entry is not None and entry.status is Status.COMPLETED and entry.value == "old"


async def test_a_value_the_codec_cannot_encode_fails_that_load(redis_server: RedisServer) -> None:
    async with (
        opened(RedisStore(redis_server.url), failure_ttl=30.0) as store,
        opened(RedisStore(redis_server.url)) as other,
    ):
        with pytest.raises(CodecError, match="JSONCodec cannot encode a set") as info:
            await store.load("k", value_of({1, 2}), background=False, force=False)
        assert isinstance(info.value.__cause__, TypeError)
        entry = await other.lookup("k")
        assert entry is not None and entry.status is Status.FAILED
        assert entry.error is not None and entry.error.startswith("CodecError: ")
        # nothing else is affected
        assert (await store.load("k2", value_of([1, 2]), background=False, force=False)).ran_here
        assert not await exists(redis_server, lease_key("prefetch_ingest", "k"))


async def test_custom_codec(redis_server: RedisServer) -> None:
    class Utf8Codec:
        def encode(self, value: Any) -> bytes:
            return str(value).encode("utf-8")

        def decode(self, data: bytes) -> Any:
            return data.decode("utf-8")

    async with opened(RedisStore(redis_server.url, codec=Utf8Codec())) as store:
        await store.load("k", value_of(12), background=False, force=False)
        entry = await store.lookup("k")
        assert entry is not None and entry.value == "12"
    assert JSONCodec().decode(JSONCodec().encode({"a": [1, "é"]})) == {"a": [1, "é"]}


async def test_invalidate(redis_server: RedisServer) -> None:
    async with opened(RedisStore(redis_server.url)) as store:
        assert not await store.invalidate("k")
        await store.load("k", value_of(1), background=False, force=False)
        assert await store.invalidate("k")
        assert await store.lookup("k") is None
        assert not await store.invalidate("k")


# -- several instances -----------------------------------------------------------


async def test_a_second_instance_waits_for_the_owner_and_gets_its_value(
    redis_server: RedisServer,
) -> None:
    release = anyio.Event()
    started = anyio.Event()
    results: list[Any] = []

    async def slow() -> Any:
        started.set()
        await release.wait()
        return "from A"

    async with (
        opened(RedisStore(redis_server.url, lease=5.0)) as a,
        opened(RedisStore(redis_server.url, lease=5.0)) as b,
        anyio.create_task_group() as tg,
    ):

        async def in_a() -> None:
            results.append(await a.load("k", slow, background=True, force=False))

        async def in_b() -> None:
            results.append(await b.load("k", value_of("from B"), background=False, force=False))

        tg.start_soon(in_a)
        await started.wait()
        entry = await b.lookup("k")
        assert entry is not None and entry.status is Status.RUNNING and entry.background
        tg.start_soon(in_b)
        # wait until B is subscribed and waiting (it polls nothing but the lease here)
        await until(lambda: listening(b))
        release.set()
    assert sorted((o.value, o.ran_here) for o in results) == [("from A", False), ("from A", True)]


@pytest.mark.parametrize("failure_ttl", [0.0, 30.0])
async def test_a_waiting_instance_gets_the_owners_failure(
    redis_server: RedisServer, failure_ttl: float
) -> None:
    release = anyio.Event()
    started = anyio.Event()

    async def failing() -> Any:
        started.set()
        await release.wait()
        raise KeyError("gone")

    async with (
        opened(RedisStore(redis_server.url, lease=5.0), failure_ttl=failure_ttl) as a,
        opened(RedisStore(redis_server.url, lease=5.0), failure_ttl=failure_ttl) as b,
        anyio.create_task_group() as tg,
    ):

        async def in_a() -> None:
            with pytest.raises(KeyError):
                await a.load("k", failing, background=False, force=False)

        async def in_b() -> None:
            with pytest.raises(RemoteLoadError, match="KeyError: 'gone'"):
                await b.load("k", value_of("never"), background=False, force=False)

        tg.start_soon(in_a)
        await started.wait()
        tg.start_soon(in_b)
        await until(lambda: listening(b))
        release.set()


async def test_a_forced_load_joins_the_run_in_flight(redis_server: RedisServer) -> None:
    """force=True ignores the completed value but joins another process's run."""
    release = anyio.Event()
    started = anyio.Event()
    got: list[Any] = []

    async def slow() -> Any:
        started.set()
        await release.wait()
        return "new"

    async with (
        opened(RedisStore(redis_server.url, lease=5.0)) as a,
        opened(RedisStore(redis_server.url, lease=5.0)) as b,
        anyio.create_task_group() as tg,
    ):
        await a.load("k", value_of("old"), background=False, force=False)
        tg.start_soon(functools.partial(a.load, "k", slow, background=False, force=True))

        async def in_b() -> None:
            got.append(await b.load("k", value_of("B ran"), background=False, force=True))

        await started.wait()
        tg.start_soon(in_b)
        await until(lambda: listening(b))
        release.set()
    assert [(o.value, o.ran_here) for o in got] == [("new", False)]


async def test_lease_is_renewed_while_the_load_runs(redis_server: RedisServer) -> None:
    """A load longer than its lease keeps the lease (renewed every lease/3) and stores its value."""
    name = lease_key("prefetch_ingest", "k")

    async def long_load() -> Any:
        seen: list[int] = []

        async def renewed() -> bool:
            pttl = int(redis_server.command("PTTL", name))
            seen.append(pttl)
            return len(seen) > 1 and pttl > seen[-2]  # the expiry moved forward

        await until(renewed)
        await until(renewed)
        return "done"

    async with opened(RedisStore(redis_server.url, lease=0.9)) as store:
        outcome = await store.load("k", long_load, background=False, force=False)
        assert outcome.ran_here
        entry = await store.lookup("k")
        assert entry is not None and entry.value == "done"


async def test_fencing_a_run_that_lost_its_lease_cannot_overwrite(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner stalls past its lease; another instance takes over and completes; the
    stale owner's completion is refused and logged."""
    a = RedisStore(redis_server.url, lease=0.4)
    b = RedisStore(redis_server.url, lease=5.0)

    async def no_renewal(*args: Any) -> None:  # the owner is "paused"
        await anyio.sleep_forever()

    monkeypatch.setattr(a, "_renew_loop", no_renewal)
    name = lease_key("prefetch_ingest", "k")

    async def stale() -> Any:
        await until(lambda: not_(exists(redis_server, name)))  # lease lapsed
        outcome = await b.load("k", value_of("newer"), background=False, force=False)
        assert outcome.ran_here
        return "stale"

    async with opened(a), opened(b):
        with capture_logs() as logs:
            outcome = await a.load("k", stale, background=False, force=False)
        assert outcome.value == "stale"  # the caller here still gets its own value
        entry = await b.lookup("k")
        assert entry is not None and entry.value == "newer"  # the newer result stands
    assert any(
        e["event"] == "prefetch.store_lease_lost"
        and (e["store"], e["when"]) == ("Redis", "completion")
        for e in logs
    )


async def test_takeover_when_the_owner_stops_renewing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner that stalls forever (as if dead): a waiter takes the lease over and completes."""
    a = RedisStore(redis_server.url, lease=0.4)
    b = RedisStore(redis_server.url, lease=5.0)

    async def no_renewal(*args: Any) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(a, "_renew_loop", no_renewal)
    started = anyio.Event()

    async def hang() -> Any:
        started.set()
        await anyio.sleep_forever()

    async with opened(a), opened(b), anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(a.load, "k", hang, background=False, force=False))
        await started.wait()
        outcome = await b.load("k", value_of("taken over"), background=False, force=False)
        assert outcome.ran_here and outcome.value == "taken over"
        tg.cancel_scope.cancel()


async def test_cancelled_load_releases_its_lease(redis_server: RedisServer) -> None:
    started = anyio.Event()

    async def hang() -> Any:
        started.set()
        await anyio.sleep_forever()

    name = lease_key("prefetch_ingest", "k")
    async with opened(RedisStore(redis_server.url, lease=30.0)) as store:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(store.load, "k", hang, background=False, force=False))
            await started.wait()
            assert 0 < redis_server.command("PTTL", name) <= 30_000
            tg.cancel_scope.cancel()
        assert not await exists(redis_server, name)
        assert await store.lookup("k") is None


async def test_progress_is_visible_to_other_instances(redis_server: RedisServer) -> None:
    started = anyio.Event()
    release = anyio.Event()

    async with (
        opened(RedisStore(redis_server.url)) as a,
        opened(RedisStore(redis_server.url)) as b,
        anyio.create_task_group() as tg,
    ):

        async def run() -> Any:
            started.set()
            await release.wait()
            return 1

        tg.start_soon(functools.partial(a.load, "k", run, background=True, force=False))
        await started.wait()
        # b's reader must be subscribed first: its subscription wakes every waiter (messages
        # may have been lost), which would end the wait below early (seen under CPU load)
        subscribed = b._redis._subscribed
        assert subscribed is not None
        with anyio.fail_after(15):
            await subscribed.wait()

        async def changed() -> None:
            await b.wait_change("k", 10.0)

        tg.start_soon(changed)
        await until(lambda: listening(b))
        await a.publish_progress("k", Progress(done=3, total=10, message="step 3"))
        entry = await b.lookup("k")
        assert entry is not None and entry.status is Status.RUNNING
        assert entry.progress == Progress(done=3, total=10, message="step 3")
        await until(lambda: not_(listening(b)))  # wait_change woke up
        release.set()


# -- hostile data ---------------------------------------------------------------


class _Evil:
    """A pickle that would create a file when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (str(self.path), "w"))


_TOKEN, _FENCE = b"0123456789abcdef", b"1" * 16
_TIMES = struct.pack(">ddd?", 1.0, 2.0, math.nan, False)
CORRUPT: list[Any] = [
    pytest.param(lambda _: b"\x00\xffrandom", id="garbage"),
    pytest.param(lambda sentinel: pickle.dumps(_Evil(sentinel)), id="pickle"),
    pytest.param(lambda _: b"Pc" + _TOKEN + _FENCE + _TIMES[:-1], id="truncated"),
    pytest.param(lambda _: b"Px" + _TOKEN + _FENCE + _TIMES + b"{}", id="unknown-kind"),
    pytest.param(lambda _: b"Pc" + b"\xff" * 16 + _FENCE + _TIMES + b"{}", id="token-not-ascii"),
    pytest.param(lambda _: b"Pc" + _TOKEN + b"x" * 16 + _TIMES + b"{}", id="not-a-fence"),
    pytest.param(
        lambda _: b"Pc" + _TOKEN + _FENCE + struct.pack(">ddd?", math.inf, 2.0, math.nan, False),
        id="infinite-start",
    ),
    pytest.param(lambda _: b"Pf" + _TOKEN + _FENCE + _TIMES + b"no NUL", id="failure-no-nul"),
    pytest.param(lambda _: b"PI2c" + b"0" * 32 + b"1" * 16 + b'{"k":"x"}\n{}', id="v1-layout"),
]


@pytest.mark.parametrize("make_payload", CORRUPT)
async def test_corrupt_or_foreign_records_are_reported_and_reloaded(
    redis_server: RedisServer, tmp_path: Path, make_payload: Callable[[Path], bytes]
) -> None:
    """Garbage, a pickle that would run a command, records of this layout broken in each
    field, the layout of v1: nothing runs, the entry is reported as corrupt (logged, by
    digest) and loaded again.

    (v1 also refused a record copied from another key: its header carried the key's digest.
    The v2 outcome layout has no digest, so a copied record is a well-formed record.)"""
    sentinel = tmp_path / "pwned"
    payload = make_payload(sentinel)
    key = ("victim", 1)
    async with opened(RedisStore(redis_server.url, poll_interval=0.05)) as store:
        redis_server.command("SET", record_key("prefetch_ingest", key), payload)
        with capture_logs() as logs:
            assert await store.lookup(key) is None
            with anyio.fail_after(5):  # a load that never ends fails here
                outcome = await store.load(key, value_of("fresh"), background=False, force=False)
        assert outcome.ran_here and outcome.value == "fresh"
        corrupt = [e for e in logs if e["event"] == "prefetch.redis_corrupt_entry"]
        assert corrupt and corrupt[0]["digest"] == digest_of(key), logs
        entry = await store.lookup(key)
        assert entry is not None and entry.value == "fresh"
    assert not sentinel.exists()


async def test_undecodable_value_is_corrupt(redis_server: RedisServer) -> None:
    class Strict:
        def encode(self, value: Any) -> bytes:
            return b"ok"

        def decode(self, data: bytes) -> Any:
            raise ValueError("unreadable")

    async with opened(RedisStore(redis_server.url, codec=Strict())) as store:
        await store.load("k", value_of(1), background=False, force=False)
        with capture_logs() as logs:
            assert await store.lookup("k") is None
        assert logs[0]["event"] == "prefetch.store_corrupt_entry"
        assert logs[0]["store"] == "Redis" and "unreadable" in logs[0]["error"]


# -- Redis unreachable ----------------------------------------------------------


async def test_unreachable_redis_is_a_store_error(redis_server: RedisServer) -> None:
    redis_server.kill()  # a port where nothing listens
    store = RedisStore(redis_server.url)
    with capture_logs() as logs, pytest.raises(StoreError, match="unreachable") as info:
        await store.open(ttl=None, failure_ttl=0.0)
    assert info.value.__cause__ is not None
    assert logs[-1]["event"] == "prefetch.store_unavailable"
    assert (logs[-1]["store"], logs[-1]["operation"]) == ("Redis", "open")


async def test_fallback_local_runs_in_process(redis_server: RedisServer) -> None:
    redis_server.kill()
    with capture_logs() as logs:
        async with opened(RedisStore(redis_server.url, fallback="local")) as store:
            assert await store.lookup("k") is None
            outcome = await store.load("k", value_of(5), background=False, force=False)
            assert outcome.ran_here and outcome.value == 5
            assert not await store.invalidate("k")
    assert {e["event"] for e in logs} == {"prefetch.store_unavailable"}
    assert {(e["store"], e["fallback"], e["log_level"]) for e in logs} == {
        ("Redis", "local", "warning")
    }
    assert {"open", "read", "acquire", "invalidate"} <= {e["operation"] for e in logs}


async def test_redis_gone_mid_load_hands_the_value_over_unstored(
    redis_server: RedisServer,
) -> None:
    """v2: a completion that cannot reach Redis is no StoreError: the value goes to the
    local waiters at once (``deliver``), the write is retried while the lease may live,
    then the load returns it with ``stored=False``. Later operations are StoreErrors."""
    delivered: list[Any] = []

    async def run() -> Any:
        redis_server.kill()
        return "computed"

    async with opened(RedisStore(redis_server.url, lease=0.5)) as store:
        with capture_logs() as logs:
            outcome = await store.load(
                "k", run, background=False, force=False, deliver=delivered.append
            )
        assert (outcome.value, outcome.ran_here, outcome.stored) == ("computed", True, False)
        assert delivered == ["computed"]
        events = [e["event"] for e in logs]
        assert "prefetch.store_result_not_stored" in events
        assert any(
            e["event"] == "prefetch.store_unavailable" and e["operation"] == "complete"
            for e in logs
        )
        with capture_logs(), pytest.raises(StoreError, match="unreachable"):
            await store.lookup("k")


async def test_redis_restarted_mid_load_keeps_the_lease_and_the_result(
    durable_redis: RedisServer,
) -> None:
    """With persistence, Redis stopped and started again during a load: the owner keeps its
    lease (on disk), stores its result, and a brand-new instance reads it."""

    async def run() -> Any:
        durable_redis.stop()
        durable_redis.start()
        return {"survived": True}

    async with opened(RedisStore(durable_redis.url, lease=10.0)) as store:
        with capture_logs():
            outcome = await store.load("k", run, background=False, force=False)
        assert outcome.ran_here
    durable_redis.restart()
    async with opened(RedisStore(durable_redis.url)) as fresh:
        entry = await fresh.lookup("k")
        assert entry is not None and entry.value == {"survived": True}


async def test_an_application_client_is_not_closed(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with opened(RedisStore(client)) as store:
            await store.load("k", value_of(1), background=False, force=False)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_logs_escape_keys_and_hide_passwords(redis_server: RedisServer) -> None:
    """A key with a newline is logged as one escaped repr; a URL's password never shows.

    v2: the Redis backend addresses entries by digest only, so its own corrupt-entry event
    names the digest and never the key; the lease algorithm's events carry the key."""
    key = "x\n[CRITICAL] forged"

    class Unreadable:
        def encode(self, value: Any) -> bytes:
            return b"1"

        def decode(self, data: bytes) -> Any:
            raise ValueError("unreadable")

    async with (
        opened(RedisStore(redis_server.url)) as store,
        opened(RedisStore(redis_server.url, codec=Unreadable())) as strict,
    ):
        redis_server.command("SET", record_key("prefetch_ingest", key), b"garbage")
        with capture_logs() as logs:
            assert await store.lookup(key) is None
        (event,) = logs
        assert event["event"] == "prefetch.redis_corrupt_entry"
        assert event["digest"] == digest_of(key) and "forged" not in repr(event)
        await store.load(key, value_of(1), background=False, force=True)
        with capture_logs() as logs:
            assert await strict.lookup(key) is None
        (event,) = logs
        assert event["event"] == "prefetch.store_corrupt_entry"
        assert "\n" not in event["key"] and event["key"] == repr(key)
        redis_server.kill()
        with capture_logs() as logs, pytest.raises(StoreError):
            await store.lookup(key)
        (event,) = logs
        assert event["event"] == "prefetch.store_unavailable"
        assert "\n" not in event["key"] and event["key"] == repr(key)
    url = redis_server.url.replace("redis://", "redis://user:hunter2@")
    store = RedisStore(url)
    with capture_logs() as logs, pytest.raises(StoreError) as info:
        await store.open(ttl=None, failure_ttl=0.0)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(logs)


async def test_close_ends_even_when_a_cancellation_is_swallowed_by_the_client() -> None:
    """A peer that accepts every connection and drops it at once (a proxy with no healthy
    Redis behind it): the notification reader keeps reconnecting, and on Python 3.11 a
    cancellation landing inside redis-py's connect can be swallowed. ``aclose`` cancels
    again until the reader ends, so it never waits forever."""
    import asyncio
    import random

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with capture_logs():
            for _ in range(80):
                client = aioredis.Redis(host="127.0.0.1", port=port, retry=None)  # type: ignore[arg-type]  # redis-py accepts None: no retries
                store = RedisStore(client, fallback="local", poll_interval=0.05)
                await store.open(ttl=None, failure_ttl=0.0)
                await store.wait_change("k", 0.01)  # starts the reader
                await anyio.sleep(random.random() * 0.1)  # it reconnects every poll_interval
                closing = asyncio.get_running_loop().create_task(store.aclose())
                done, _ = await asyncio.wait({closing}, timeout=5)
                assert done, "RedisStore.aclose did not end"
                await client.aclose()
    finally:
        server.close()
        await server.wait_closed()


def test_a_redis_py_too_old_for_the_store_is_named_in_the_import_error(tmp_path: Path) -> None:
    """redis-py 5.0-5.2 lack redis.backoff.ExponentialWithJitterBackoff: the error says so
    (checked for real against redis==5.2.1 in a scratch venv when this was written; here an
    installed package of that shape stands in, in a subprocess, so the suite's redis-py is
    untouched)."""
    old = tmp_path / "redis"
    (old / "asyncio").mkdir(parents=True)
    (old / "__init__.py").write_text('__version__ = "5.2.1"\n')
    (old / "asyncio" / "__init__.py").write_text("")
    (old / "asyncio" / "retry.py").write_text("class Retry: ...\n")
    (old / "backoff.py").write_text("class ExponentialBackoff: ...\n")
    (old / "exceptions.py").write_text(
        "class RedisError(Exception): ...\nConnectionError = RedisError\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import prefetch_ingest.redis"],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{SRC}"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "needs redis-py 5.3 or later, found 5.2.1" in done.stderr


def test_the_redis_extra_requires_a_redis_py_the_store_can_import() -> None:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'redis = ["redis>=5.3"]' in text
