"""No secret of a Redis URL reaches a repr, an error or a log event (issue 12 symptom:
``?password=`` was printed in all three)."""

from __future__ import annotations

import socket

import pytest
from structlog.testing import capture_logs

from prefetch_ingest import Prefetcher, StoreError
from prefetch_ingest.redis import RedisStore, redact

pytestmark = pytest.mark.anyio

SECRET = "hunter2-s3cret"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "template",
    [
        "redis://127.0.0.1:{port}/0?password=" + SECRET,
        "redis://127.0.0.1:{port}/0?socket_timeout=1&password=" + SECRET,
        "redis://someone:" + SECRET + "@127.0.0.1:{port}/0",
        "redis://:" + SECRET + "@127.0.0.1:{port}/0?password=" + SECRET,
    ],
)
async def test_no_secret_in_repr_errors_or_logs(template: str) -> None:
    url = template.format(port=_closed_port())
    store = RedisStore(url, lease=1.0)
    assert SECRET not in repr(store)
    with capture_logs() as logs, pytest.raises(StoreError) as caught:
        async with Prefetcher(store=store):
            pass
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    assert logs, "the outage was logged"
    assert SECRET not in repr(logs)


def test_a_bad_url_error_names_it_without_its_secret() -> None:
    with pytest.raises(ValueError, match="url_or_client") as caught:
        RedisStore("http://x:" + SECRET + "@host/?password=" + SECRET)
    assert SECRET not in str(caught.value)


def test_redact_keeps_what_is_not_secret() -> None:
    assert redact("redis://h:1/0?db=2&password=x") == "redis://h:1/0?db=2&password=***"
    assert redact("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
