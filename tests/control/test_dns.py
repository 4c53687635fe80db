"""The VM side's name server on loopback, on uvloop, with a fake upstream
nameserver on loopback too; queries are built and parsed with dnspython."""

import asyncio
import socket
import threading

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from control import dns as names

HOST_IP = "192.168.251.2"
UPSTREAM_IP = "10.9.9.9"


class FakeUpstream:
    """A nameserver on loopback that answers every A query with
    UPSTREAM_IP, or stays silent when ``silent`` is set."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.silent = False
        self.asked = []
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            self.asked.append(query.question[0].name.to_text())
            if self.silent:
                continue
            response = dns.message.make_response(query)
            response.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", "A", UPSTREAM_IP)
            )
            self.sock.sendto(response.to_wire(), addr)

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


class ServerThread:
    """A DnsServer on a uvloop event loop in a thread of its own."""

    def __init__(self, table, **kwargs):
        self.table = table
        self.kwargs = kwargs
        self.ready = threading.Event()
        self.loop = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def run(self):
        self.loop = uvloop.new_event_loop()
        self.loop.run_until_complete(self.serve())
        self.loop.close()

    async def serve(self):
        self.stop = asyncio.get_running_loop().create_future()
        self.server = names.DnsServer(self.table, **self.kwargs)
        self.port = self.server.start("127.0.0.1", 0)
        self.ready.set()
        await self.stop
        self.server.close()
        await asyncio.sleep(0)

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set_result, None)
        self.thread.join(5)


@pytest.fixture
def upstream():
    up = FakeUpstream()
    yield up
    up.close()


@pytest.fixture
def table():
    t = names.NameTable()
    t.apply(
        [
            ["dns", "dev.test"],
            ["host", HOST_IP, "app.dev.test", "api.v1.dev.test"],
            ["host", "10.0.0.5", "db.dev.test"],
        ]
    )
    return t


@pytest.fixture
def server(tmp_path, table, upstream):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# generated\nsearch example\nnameserver 127.0.0.1\noptions ndots:1\n"
    )
    s = ServerThread(
        table, resolv_conf=str(resolv), upstream_port=upstream.port, timeout_s=0.5
    )
    yield s
    s.close()


def ask(server, name, rdtype="A"):
    return dns.query.udp(
        dns.message.make_query(name, rdtype), "127.0.0.1", port=server.port, timeout=3
    )


def records(response):
    return [
        (rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype), [r.to_text() for r in rr])
        for rr in response.answer
    ]


def test_table_applies_dns_and_host_commands_like_the_upstream():
    t = names.NameTable()
    changed, skipped = t.apply(
        [["dns", "Dev.Test.", "b.test"], ["host", HOST_IP, "App.Dev.Test"]]
    )
    assert changed and not skipped
    assert t.suffixes == ["dev.test", "b.test"]
    assert t.addresses == {"app.dev.test": names.ipaddress.IPv4Address(HOST_IP)}
    assert t.pointers == {"2.251.168.192.in-addr.arpa": "app.dev.test"}

    # a body without dns or host commands leaves the names alone
    assert t.apply([["connect", "172.18.0.0", "172.19.0.0"]]) == (False, 0)
    assert "app.dev.test" in t.addresses

    # a body with names is the whole table; -SUFFIX stops serving one
    changed, _ = t.apply([["dns", "-b.test"], ["host", "10.0.0.5", "db.dev.test"]])
    assert changed and t.suffixes == ["dev.test"]
    assert list(t.addresses) == ["db.dev.test"]

    # malformed fields are skipped and counted, the rest applied
    changed, skipped = t.apply(
        [["dns", "dev.test"], ["host", "not-an-ip", "x.dev.test"], ["host", "10.0.0.6"]]
    )
    assert skipped == 1 and t.addresses == {}


def test_known_name_gets_its_a_record(server):
    response = ask(server, "app.dev.test")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert records(response) == [("app.dev.test.", "A", [HOST_IP])]


def test_names_are_case_insensitive_and_keep_the_query_spelling(server):
    assert records(ask(server, "APP.Dev.Test")) == [("APP.Dev.Test.", "A", [HOST_IP])]


def test_ptr_answers_the_first_name_of_the_address(server):
    response = ask(server, "2.251.168.192.in-addr.arpa", "PTR")
    assert records(response) == [
        ("2.251.168.192.in-addr.arpa.", "PTR", ["app.dev.test."])
    ]


def test_aaaa_for_a_known_name_is_an_empty_noerror_answer(server):
    response = ask(server, "app.dev.test", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert response.authority  # the SOA, for negative caching


def test_unknown_name_under_a_served_suffix_is_nxdomain(server, upstream):
    response = ask(server, "nope.dev.test")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert upstream.asked == []


def test_suffix_itself_and_names_between_exist_without_records(server):
    for name in ("dev.test", "v1.dev.test"):
        response = ask(server, name)
        assert response.rcode() == dns.rcode.NOERROR and response.answer == [], name


def test_other_names_are_forwarded_to_the_resolv_conf_nameserver(server, upstream):
    for name in ("fakedev.test", "example.org"):
        response = ask(server, name)
        assert records(response) == [(f"{name}.", "A", [UPSTREAM_IP])]
    assert upstream.asked == ["fakedev.test.", "example.org."]


def test_ptr_of_an_unknown_address_is_forwarded(server, upstream):
    ask(server, "9.9.9.10.in-addr.arpa", "PTR")
    assert upstream.asked == ["9.9.9.10.in-addr.arpa."]


def test_silent_upstream_gives_servfail_after_the_timeout(server, upstream):
    upstream.silent = True
    response = ask(server, "example.org")
    assert response.rcode() == dns.rcode.SERVFAIL
    assert server.server.statistics()["forward_failed"] == 1


def test_server_never_forwards_to_itself(tmp_path, table):
    resolv = tmp_path / "resolv.conf"
    s = ServerThread(table, resolv_conf=str(resolv), timeout_s=0.5)
    try:
        s.server.upstream_port = s.port  # resolv.conf names our own address
        resolv.write_text("nameserver 127.0.0.1\n")
        assert s.server.nameservers() == []
        assert ask(s, "example.org").rcode() == dns.rcode.SERVFAIL
    finally:
        s.close()


def test_malformed_datagrams_are_counted_and_dropped(server):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(b"\x12\x34garbage", ("127.0.0.1", server.port))
        assert ask(server, "app.dev.test").rcode() == dns.rcode.NOERROR  # still serving
    finally:
        sock.close()
    assert server.server.statistics()["malformed"] == 1


def test_resolv_conf_nameservers_are_read_in_order(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text(
        "nameserver 10.0.0.1\n"
        "# nameserver 10.0.0.9\n"
        "nameserver fe80::1%eth0\n"
        "nameserver bogus\n"
        "nameserver 10.0.0.2 ; x\n"
    )
    assert [str(ip) for ip in names.read_nameservers(str(path))] == [
        "10.0.0.1",
        "fe80::1%eth0",
        "10.0.0.2",
    ]
    assert names.read_nameservers(str(tmp_path / "missing")) == []


def test_queries_from_other_interfaces_are_refused(server):
    server.server.interfaces = frozenset({socket.if_nametoindex("lo") + 100000})
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(
            dns.message.make_query("app.dev.test", "A"),
            "127.0.0.1",
            port=server.port,
            timeout=0.5,
        )
    assert server.server.statistics()["refused"] == 1
    server.server.interfaces = frozenset({socket.if_nametoindex("lo")})
    assert ask(server, "app.dev.test").rcode() == dns.rcode.NOERROR
