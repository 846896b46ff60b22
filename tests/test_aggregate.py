"""``--workers`` with ``--http-port``: the supervisor's one HTTP port for the whole relay
(issue 14 item 18). The merging is plain functions; one test runs the port in-process
over two relays whose side ports listen on Unix sockets, as workers' do."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import trio
from helpers import http_request
from prometheus_client.parser import text_string_to_metric_families

from trio_relay import RelayConfig, serve_metrics
from trio_relay._aggregate import (
    merge_health,
    merge_metrics,
    merge_stats,
    open_unix_listener,
    serve_workers_http,
)
from trio_relay.testing import open_memory_relay

WORKER_TEXT = """# HELP trio_relay_connections Open client connections.
# TYPE trio_relay_connections gauge
trio_relay_connections {connections}
# HELP trio_relay_messages_received_total Messages received from clients.
# TYPE trio_relay_messages_received_total counter
trio_relay_messages_received_total {received}
# HELP trio_relay_connections_rejected_total Connections refused, by reason.
# TYPE trio_relay_connections_rejected_total counter
trio_relay_connections_rejected_total{{reason="http-400"}} 0.0
trio_relay_connections_rejected_total{{reason="http-503"}} {refused}
"""


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_of_every_worker_in_one_text_labelled_by_worker() -> None:
    merged = merge_metrics(
        [
            ("0", WORKER_TEXT.format(connections=3, received=10, refused=1)),
            ("1", WORKER_TEXT.format(connections=4, received=20, refused=0)),
        ],
        configured=3,
    )
    text = merged.decode()
    # One HELP and TYPE per family, whatever the number of workers.
    assert text.count("# TYPE trio_relay_connections gauge") == 1
    assert text.count("# TYPE trio_relay_connections_rejected_total counter") == 1
    got = samples(merged)
    assert got[("trio_relay_connections", (("worker", "0"),))] == 3
    assert got[("trio_relay_connections", (("worker", "1"),))] == 4
    assert got[("trio_relay_messages_received_total", (("worker", "1"),))] == 20
    rejected = ("reason", "http-503")
    assert got[("trio_relay_connections_rejected_total", (rejected, ("worker", "0")))] == 1
    assert got[("trio_relay_workers", ())] == 3
    assert got[("trio_relay_workers_up", ())] == 2


def test_health_of_the_whole_relay() -> None:
    ok = {"status": "ok", "connections": 2, "backplane": "up"}
    cut_off = {"status": "degraded", "connections": 5, "backplane": "down"}
    assert merge_health([ok, ok], 2) == (
        200,
        b'{"status": "ok", "connections": 4, "backplane": "up", "workers": 2, "workers_up": 2}\n',
    )
    status, body = merge_health([ok], 2)  # one worker did not answer
    assert (status, json.loads(body)["status"]) == (200, "degraded")
    status, body = merge_health([ok, cut_off], 2)
    assert json.loads(body) == {
        "status": "degraded",
        "connections": 7,
        "backplane": "down",
        "workers": 2,
        "workers_up": 2,
    }
    status, body = merge_health([], 2)
    assert (status, json.loads(body)) == (
        503,
        {"status": "down", "connections": 0, "workers": 2, "workers_up": 0},
    )


def test_stats_summed_over_the_workers() -> None:
    first = {"connections": 1, "topics": 2, "rejected": {"http-400": 1}, "tls": False, "ports": [1]}
    second = {"connections": 3, "topics": 1, "rejected": {"http-400": 2, "http-503": 1}}
    assert merge_stats([first, {**second, "tls": False, "ports": [1]}], 2) == {
        "connections": 4,
        "topics": 3,
        "rejected": {"http-400": 3, "http-503": 1},
        "tls": False,
        "ports": [1],
        "workers": 2,
        "workers_up": 2,
    }


async def test_one_port_answers_for_workers_on_unix_sockets(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    paths = [
        str(tmp_path / "worker-0.sock"),
        str(tmp_path / "worker-1.sock"),
        str(tmp_path / "gone"),
    ]
    async with open_memory_relay() as first, open_memory_relay() as second:
        for relay, path in zip((first, second), paths, strict=False):
            unix = await open_unix_listener(path)
            await nursery.start(partial(serve_metrics, relay.server, None, 0, listeners=[unix]))
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        limits = RelayConfig()
        await nursery.start(
            partial(
                serve_workers_http,
                paths,  # the third worker is not running: it is left out, counted down
                [listener],
                max_connections=limits.http_max_connections,
                request_timeout=limits.http_request_timeout,
            )
        )
        async with first.consume(), first.consume(), second.consume():
            with trio.fail_after(10):
                status, _, body = await http_request(port, "/metrics")
                got = samples(body)
                assert got[("trio_relay_connections", (("worker", "0"),))] == 2
                assert got[("trio_relay_connections", (("worker", "1"),))] == 1
                assert got[("trio_relay_workers_up", ())] == 2
                status, _, body = await http_request(port, "/healthz")
                assert json.loads(body)["connections"] == 3
                assert json.loads(body)["status"] == "degraded"
                status, _, body = await http_request(port, "/stats")
                assert json.loads(body)["subscribers"] == 3
                # Anything else goes to one worker as it came: the console, the API.
                status, _, body = await http_request(port, "/")
                assert status == 200 and b"<html" in body.lower()
                status, _, body = await http_request(port, "/api/history?topic=news")
                assert (status, json.loads(body)["messages"]) == (200, [])
        nursery.cancel_scope.cancel()
