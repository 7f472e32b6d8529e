"""Every Python snippet of the README and the guide runs as written.

Each ```python block is saved as a module and run in a fresh interpreter. A block
that defines a FastAPI ``app`` is served by uvicorn (its lifespan included) and
driven over HTTP: the Query starts an ingest, the event stream follows
it to ``completed``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "docs" / "guide.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

DRIVE_APP = """
import asyncio, json, socket, sys
sys.path.insert(0, {here!r})
import httpx, uvicorn
from snippet import app


async def main():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn offers no event for it
        assert not serving.done(), "the server did not start"
        await asyncio.sleep(0.01)
    base = f"http://127.0.0.1:{{port}}/api/projects/p1/runs/r1"
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.post(base + "/query")).status_code == 200
        states = []
        async with client.stream("GET", base + "/ingest/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    states.append(json.loads(line[5:]))
    assert states and states[-1]["status"] == "completed", states
    assert states[-1]["stats"] == {{"papers": 120, "authors": 431}}
    server.should_exit = True
    await serving
    sock.close()


asyncio.run(main())
"""


def _snippets() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", m.group(1)))
    return found


SNIPPETS = _snippets()


def test_the_pages_have_snippets() -> None:
    assert len(SNIPPETS) >= 6


@pytest.mark.parametrize(("where", "code"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_the_snippet_runs_as_written(where: str, code: str, tmp_path: Path) -> None:
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    if re.search(r"^app = FastAPI\(", code, re.M):
        script = ["-c", DRIVE_APP.format(here=str(tmp_path))]
    else:
        script = [str(tmp_path / "snippet.py")]
    done = subprocess.run(
        [sys.executable, "-W", "error", *script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{where} does not run:\n{done.stdout}\n{done.stderr}"


def test_a_snippet_that_streams_a_watch_closes_it_with_aclosing() -> None:
    """A stream that iterates ``watch`` bare keeps its watcher until the garbage
    collector finds it when the client goes away; the example needs ``aclosing``."""
    streaming = [(w, c) for w, c in SNIPPETS if ".watch(" in c and "yield" in c]
    assert streaming, "the guide shows server-sent events"
    bare = [w for w, c in streaming if "aclosing(" not in c]
    assert not bare, f"snippets iterating watch() without contextlib.aclosing: {bare}"
