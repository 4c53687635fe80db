"""The proxy listeners on loopback: diffing lines, relaying, half-close,
failures, on both asyncio's and uvloop's event loops."""

import asyncio
import logging
import socket

import pytest
import uvloop

from control.config import Proxy
from control.proxy import ProxySet, line_text

LO = "127.0.0.1"
TEST_TIMEOUT_S = 10.0


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a test coroutine to its end on one kind of loop, bounded in time,
    and check that it leaves no task behind."""
    runner = asyncio.run if request.param == "asyncio" else uvloop.run

    async def bounded(coro):
        await asyncio.wait_for(coro, TEST_TIMEOUT_S)
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    return lambda coro: runner(bounded(coro))


def free_port():
    with socket.socket() as s:
        s.bind((LO, 0))
        return s.getsockname()[1]


async def echo_server():
    """A target that sends back what it gets and passes EOF on."""

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, LO, 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port, data=b"hello"):
    reader, writer = await asyncio.open_connection(LO, port)
    writer.write(data)
    got = await reader.readexactly(len(data))
    writer.close()
    return got


async def stopped(*servers):
    for server in servers:
        server.close()
        await server.wait_closed()


def test_line_text_gives_the_shortest_form():
    assert line_text(Proxy(None, 8080, 8080)) == "proxy 8080"
    assert line_text(Proxy(None, 8080, 9090)) == "proxy 8080:9090"
    assert line_text(Proxy("10.0.0.5", 80, 8080)) == "proxy 10.0.0.5:80:8080"


def test_apply_listens_and_relays_both_ways_with_counters(run):
    async def main():
        target, port = await echo_server()
        listen = free_port()
        proxies = ProxySet(LO)
        assert await proxies.apply([Proxy(None, port, listen)]) == {}
        assert await exchange(listen, b"ping" * 1000) == b"ping" * 1000
        stats = proxies.statistics()[f"proxy {port}:{listen}"]
        assert stats["listening"] and stats["error"] is None
        assert stats["listen"] == f"{LO}:{listen}" and stats["target"] == f"{LO}:{port}"
        assert stats["connections"] == 1
        assert stats["bytes_up"] == stats["bytes_down"] == 4000
        await proxies.close()
        await stopped(target)

    run(main())


def test_eof_passes_each_way_and_the_other_direction_carries_on(run):
    async def after_eof(reader, writer):
        data = await reader.read()  # until the client's EOF
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()
        writer.write_eof()
        writer.close()

    async def main():
        target = await asyncio.start_server(after_eof, LO, 0)
        port, listen = target.sockets[0].getsockname()[1], free_port()
        proxies = ProxySet(LO)
        await proxies.apply([Proxy(LO, port, listen)])
        reader, writer = await asyncio.open_connection(LO, listen)
        writer.write(b"x" * 300000)
        writer.write_eof()
        assert await reader.read() == b"got 300000 bytes"  # then EOF
        writer.close()
        await proxies.close()
        await stopped(target)

    run(main())


def test_line_that_cannot_listen_is_reported_others_work_and_retried(run, caplog):
    caplog.set_level(logging.INFO, logger="control.proxy")

    async def main():
        target, port = await echo_server()
        good, busy = free_port(), free_port()
        blocker = socket.socket()
        blocker.bind((LO, busy))
        blocker.listen()
        lines = [Proxy(None, port, good), Proxy(None, port, busy)]
        proxies = ProxySet(LO)
        failed = await proxies.apply(lines)
        assert list(failed) == [f"proxy {port}:{busy}"]
        assert "Address already in use" in failed[f"proxy {port}:{busy}"]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert f'line="proxy {port}:{busy}"' in errors[0]
        assert "Address already in use" in errors[0]
        assert not proxies.statistics()[f"proxy {port}:{busy}"]["listening"]
        assert await exchange(good) == b"hello"

        # the next apply tries the failed line again
        blocker.close()
        assert await proxies.apply(lines) == {}
        assert await exchange(busy) == b"hello"
        await proxies.close()
        await stopped(target)

    run(main())


def test_unchanged_line_keeps_its_listener_and_a_new_target_needs_no_rebind(run):
    async def main():
        (t1, p1), (t2, p2) = await echo_server(), await echo_server()
        a, b = free_port(), free_port()
        proxies = ProxySet(LO)
        await proxies.apply([Proxy(None, p1, a)])
        server = proxies._listeners[a].server
        await proxies.apply([Proxy(None, p1, a), Proxy(None, p1, b)])
        assert proxies._listeners[a].server is server

        # same LISTEN port, other target: same listener, new connections go there
        await stopped(t1)
        await proxies.apply([Proxy(None, p2, a)])
        assert proxies._listeners[a].server is server
        assert await exchange(a) == b"hello"
        assert proxies.statistics()[f"proxy {p2}:{a}"]["target"] == f"{LO}:{p2}"
        await proxies.close()
        await stopped(t2)

    run(main())


def test_removed_line_stops_listening_while_its_connections_finish(run):
    async def main():
        target, port = await echo_server()
        keep, drop = free_port(), free_port()
        proxies = ProxySet(LO)
        await proxies.apply([Proxy(None, port, keep), Proxy(None, port, drop)])
        reader, writer = await asyncio.open_connection(LO, drop)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"

        await proxies.apply([Proxy(None, port, keep)])
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LO, drop)
        writer.write(b"after")  # the open connection still relays
        assert await reader.readexactly(5) == b"after"
        assert await exchange(keep) == b"hello"
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await proxies.close()
        await stopped(target)

    run(main())


def test_refusing_target_resets_the_client_at_once(run):
    async def main():
        listen, nobody = free_port(), free_port()
        proxies = ProxySet(LO)
        await proxies.apply([Proxy(None, nobody, listen)])
        reader, writer = await asyncio.open_connection(LO, listen)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 2.0)
        writer.close()
        stats = proxies.statistics()[f"proxy {nobody}:{listen}"]
        assert stats["connections"] == 1 and stats["target_failures"] == 1
        assert stats["active"] == 0
        await proxies.close()

    run(main())


def test_target_equal_to_the_listen_address_is_refused(run):
    async def main():
        port = free_port()
        proxies = ProxySet(LO)
        failed = await proxies.apply([Proxy(LO, port, port)])
        assert failed == {
            f"proxy {LO}:{port}": "the target is a proxy's own listening address"
        }
        await proxies.close()

    run(main())


def test_two_lines_pointing_at_each_other_are_refused(run):
    async def main():
        a, b = free_port(), free_port()
        proxies = ProxySet(LO)
        failed = await proxies.apply([Proxy(LO, a, b), Proxy(LO, b, a)])
        assert set(failed) == {f"proxy {LO}:{a}:{b}", f"proxy {LO}:{b}:{a}"}
        await proxies.close()

    run(main())


def test_close_stops_listeners_and_ends_open_connections(run):
    async def main():
        target, port = await echo_server()
        listen = free_port()
        proxies = ProxySet(LO)
        await proxies.apply([Proxy(None, port, listen)])
        reader, writer = await asyncio.open_connection(LO, listen)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        await proxies.close()
        assert proxies.statistics() == {}
        try:
            assert await asyncio.wait_for(reader.read(), 2.0) == b""
        except ConnectionResetError:
            pass  # aborted with data in flight: a reset is fine too
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LO, listen)
        with pytest.raises(RuntimeError):
            await proxies.apply([])
        await stopped(target)

    run(main())


def test_a_client_that_does_not_read_holds_back_the_target(run):
    # What the proxy holds is bounded by its stream limits; the kernel's
    # socket buffers (autotuned to a few MiB on loopback) add to it.
    offered = 64 * 1024 * 1024

    async def flood(reader, writer):
        sent = 0
        chunk = b"y" * 65536
        try:
            while sent < offered:
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def main():
        target = await asyncio.start_server(flood, LO, 0)
        port, listen = target.sockets[0].getsockname()[1], free_port()
        proxies = ProxySet(LO)
        await proxies.apply([Proxy(None, port, listen)])
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, (LO, listen))
        await asyncio.sleep(1.0)
        stats = proxies.statistics()[f"proxy {port}:{listen}"]
        assert 0 < stats["bytes_down"] < 16 * 1024 * 1024
        client.close()
        await proxies.close()
        await stopped(target)

    run(main())
