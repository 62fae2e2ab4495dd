"""Shared by the real-library test trees: no network but loopback, and one policy for a missing library."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

import pytest


def is_local(address: Any) -> bool:
    """A loopback address (or a Unix socket path)."""
    host = address[0] if isinstance(address, tuple) else address
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_network(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make non-loopback TCP/UDP connections raise for the rest of the test."""
    orig_connect, orig_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address):
            raise OSError(f"network access is disabled in {where} (tried {address!r})")

    def connect(self: socket.socket, address: Any) -> Any:
        check(self, address)
        return orig_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        check(self, address)
        return orig_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def missing_library(message: str) -> None:
    """A library the test needs is not installed: fail (skip, reported, only under CKPTX_ALLOW_MISSING_REAL=1)."""
    if os.environ.get("CKPTX_ALLOW_MISSING_REAL") == "1":
        pytest.skip(message)
    pytest.fail(message)
