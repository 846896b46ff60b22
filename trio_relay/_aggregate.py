"""The HTTP port of ``trio-relay serve --workers N``: one endpoint for the whole relay.

Each worker serves its HTTP side port (:func:`~trio_relay.serve_metrics`) on a Unix socket
in a directory only this user can enter; the supervisor serves ``--http-port`` and answers
from what the workers answer, at the moment of the request:

* ``/metrics``: every worker's metrics, each sample labelled ``worker="i"`` (sum them with
  ``sum without (worker) (...)``), plus ``trio_relay_workers`` (how many are configured)
  and ``trio_relay_workers_up`` (how many answered this scrape);
* ``/healthz``: ``connections`` summed; ``status`` ``ok`` when every worker answered (and
  none is ``degraded``), ``degraded`` when some did, HTTP 503 ``down`` when none did;
* ``/stats``: the console's figures summed over the workers that answered (``rejected``
  by reason too), with ``workers`` and ``workers_up``;
* anything else (the console's page, the HTTP API) is passed to one worker, in turn, as
  it came, and its answer back: any worker can publish to or read any topic, through the
  backplane.

Each worker is given :data:`WORKER_TIMEOUT` seconds to answer; one that does not (it is
restarting, say) is left out and counted down. Prometheus thus scrapes one target for
the relay, and per-worker figures stay visible through the label.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from itertools import count
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from ._sideport import METRICS_CONTENT_TYPE, NOT_FOUND, Answer, send_answer, serve_http

__all__ = [
    "WORKER_TIMEOUT",
    "merge_health",
    "merge_metrics",
    "merge_stats",
    "open_unix_listener",
    "serve_workers_http",
]

logger = logging.getLogger("trio_relay")

WORKER_TIMEOUT = 2.0
"""Seconds a worker has to answer the supervisor's request for its figures."""
MAX_HEAD = 16 * 1024
"""Bytes of request head read before answering 431."""
MAX_WORKER_ANSWER = 16 * 1024 * 1024
"""Bytes of a worker's answer read at most."""

_JSON = b"application/json"


async def open_unix_listener(path: str) -> trio.SocketListener:
    """A listener on the Unix socket ``path`` (a stale socket file there is replaced: a
    worker started again after a crash binds where its predecessor did)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            await trio.Path(path).unlink()
        await sock.bind(path)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


# ---------------------------------------------------------------- merging (no I/O)


def merge_metrics(texts: Sequence[tuple[str, str]], configured: int) -> bytes:
    """The Prometheus text of every ``(worker, metrics text)``, each sample labelled with
    its worker, one family per name, plus ``trio_relay_workers`` and
    ``trio_relay_workers_up``."""
    families: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
    workers = GaugeMetricFamily("trio_relay_workers", "Worker processes configured.", configured)
    up = GaugeMetricFamily(
        "trio_relay_workers_up", "Worker processes that answered this scrape.", len(texts)
    )

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            yield workers
            yield up
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def merge_health(documents: Sequence[dict[str, Any]], configured: int) -> tuple[int, bytes]:
    """The status and ``/healthz`` body of the whole relay from its workers' answers."""
    if not documents:
        body: dict[str, object] = {"status": "down", "connections": 0}
        status = 503
    else:
        every = len(documents) == configured
        body = {
            "status": "ok"
            if every and all(d.get("status") == "ok" for d in documents)
            else "degraded",
            "connections": sum(int(d.get("connections", 0)) for d in documents),
        }
        if any("backplane" in d for d in documents):
            up = all(d.get("backplane") == "up" for d in documents)
            body["backplane"] = "up" if up else "down"
        status = 200
    body.update(workers=configured, workers_up=len(documents))
    return status, json.dumps(body).encode() + b"\n"


def merge_stats(documents: Sequence[dict[str, Any]], configured: int) -> dict[str, object]:
    """The console's ``/stats`` of the whole relay: numbers summed over the workers that
    answered (``rejected`` by reason too), the rest (ports, TLS, auth, backplane) from
    the first of them."""
    merged: dict[str, object] = dict(documents[0]) if documents else {}
    for key, value in merged.items():
        if isinstance(value, int) and not isinstance(value, bool):
            merged[key] = sum(int(d.get(key, 0)) for d in documents)
        elif key == "rejected" and isinstance(value, dict):
            reasons: dict[str, int] = {}
            for document in documents:
                for reason, number in document.get("rejected", {}).items():
                    reasons[reason] = reasons.get(reason, 0) + int(number)
            merged[key] = dict(sorted(reasons.items()))
    merged.update(workers=configured, workers_up=len(documents))
    return merged


# ---------------------------------------------------------------- the trio shell


async def _ask(path: str, target: str) -> tuple[int, bytes] | None:
    """``GET target`` of the worker listening on ``path``: status and body, or None if it
    does not answer within :data:`WORKER_TIMEOUT`."""
    with trio.move_on_after(WORKER_TIMEOUT):
        try:
            stream = await trio.open_unix_socket(path)
        except OSError:
            return None
        async with stream:
            try:
                client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
                request = h11.Request(method="GET", target=target, headers=[("Host", "worker")])
                data = (client.send(request) or b"") + (client.send(h11.EndOfMessage()) or b"")
                await stream.send_all(data)
                status, body = 0, bytearray()
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_WORKER_ANSWER:
                            return None
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        return status, bytes(body)
            except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
                logger.debug("worker at %s did not answer %s: %s", path, target, exc)
                return None
    return None


async def _ask_all(paths: Sequence[str], target: str) -> list[tuple[str, bytes]]:
    """``(worker index, body)`` of each worker that answered ``target`` with 200."""
    answers: list[tuple[str, bytes] | None] = [None] * len(paths)

    async def ask(index: int) -> None:
        answer = await _ask(paths[index], target)
        if answer is not None and answer[0] == 200:
            answers[index] = (str(index), answer[1])

    async with trio.open_nursery() as nursery:
        for index in range(len(paths)):
            nursery.start_soon(ask, index)
    return [answer for answer in answers if answer is not None]


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            return None
        chunk = await stream.receive_some(16384)
        if not chunk:
            return None
        data += chunk
    return data


async def _pass_on(stream: trio.abc.HalfCloseableStream, head: bytes, path: str) -> None:
    """Hand the request (``head`` and what follows) to the worker at ``path``, and its
    answer back, until the worker closes (it answers one request per connection)."""
    try:
        worker = await trio.open_unix_socket(path)
    except OSError:
        await stream.send_all(_plain(503, b"no worker answers; try again\n"))
        return
    async with worker:

        async def upstream() -> None:
            # What the client sends after the head (a body) goes on to the worker until
            # either side closes; the worker's answer ends the exchange.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await worker.send_all(head)
                while chunk := await stream.receive_some(65536):
                    await worker.send_all(chunk)
                await worker.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while chunk := await worker.receive_some(65536):
                    await stream.send_all(chunk)
            nursery.cancel_scope.cancel()


def _plain(status: int, body: bytes) -> bytes:
    reason = {431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}[status]
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


async def serve_workers_http(
    paths: Sequence[str],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    max_connections: int,
    request_timeout: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the whole relay's HTTP port on ``listeners`` from the workers whose side ports
    listen on the Unix sockets ``paths`` (worker *i* on ``paths[i]``), until cancelled.

    Bounded as a relay's side port is: ``max_connections`` open at once (more get 503),
    ``request_timeout`` seconds per request.
    """
    turn = count()
    configured = len(paths)

    async def exchange(stream: trio.abc.HalfCloseableStream) -> None:
        head = await _read_head(stream)
        if head is None:
            await stream.send_all(_plain(431, b"request head too large or incomplete\n"))
            return
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(head)
        request = connection.next_event()
        if not isinstance(request, h11.Request):
            return
        target = request.target.split(b"?", 1)[0]
        answer: Answer | None = None
        if request.method in (b"GET", b"HEAD"):
            if target == b"/metrics":
                texts = await _ask_all(paths, "/metrics")
                decoded = [(worker, body.decode()) for worker, body in texts]
                answer = (200, METRICS_CONTENT_TYPE, merge_metrics(decoded, configured), [])
            elif target == b"/healthz":
                documents = [json.loads(body) for _, body in await _ask_all(paths, "/healthz")]
                status, body = merge_health(documents, configured)
                answer = (status, _JSON, body, [])
            elif target == b"/stats":
                documents = [json.loads(body) for _, body in await _ask_all(paths, "/stats")]
                stats = merge_stats(documents, configured)
                answer = (200, _JSON, json.dumps(stats).encode() + b"\n", [])
        if answer is not None:
            await send_answer(connection, stream, request, answer)
        elif paths:
            await _pass_on(stream, head, paths[next(turn) % configured])
        else:  # pragma: no cover - a supervisor always has workers
            await send_answer(connection, stream, request, NOT_FOUND)

    await serve_http(
        exchange,
        listeners,
        max_connections=max_connections,
        request_timeout=request_timeout,
        task_status=task_status,
    )
