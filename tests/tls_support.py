"""Certificates for the wss:// tests: one private CA (trustme) for the whole run, a server
context with a certificate for 127.0.0.1 and localhost, and a client context trusting it.

A test module imports the fixtures it uses by name (``from tls_support import ...``).
"""

from __future__ import annotations

import ssl

import pytest
import trustme

__all__ = ["ca", "client_context", "server_context"]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
