"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# -- sources: a local HTTP server and a clean memory:// filesystem ----------------------


@dataclass(frozen=True)
class HTTPServerInfo:
    """A running local HTTP server: ``url`` (no trailing slash) serves ``root``."""

    url: str
    root: Path
    port: int


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTPServerInfo]:
    """Serve a fresh empty directory over HTTP on 127.0.0.1 (an ephemeral port).

    Write files under ``http_server.root`` and fetch them at
    ``f"{http_server.url}/path"``; directories get HTML index pages, which fsspec's
    HTTP filesystem lists. The server stops when the test ends.
    """
    root = tmp_path_factory.mktemp("http-root")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="http_server", daemon=True
    )
    thread.start()
    port = server.server_address[1]
    try:
        yield HTTPServerInfo(url=f"http://127.0.0.1:{port}", root=root, port=port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def memory_fs():
    """fsspec's ``memory://`` filesystem, emptied before and after the test."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    def clear() -> None:
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]

    clear()
    yield fsspec.filesystem("memory")
    clear()


@pytest.fixture
def dead_url() -> str:
    """The URL of a port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
