"""Picking TCP ports for local servers (the stack, the S3 server, tests)."""

from __future__ import annotations

import socket

__all__ = ["free_port", "port_is_free"]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now (as the servers do, despite TIME_WAIT leftovers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, exclude: set[int] | None = None) -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if not exclude or port not in exclude:
            return port
    raise OSError(f"no free TCP port on {host}")
