import asyncio
import ipaddress

import pytest

from control import config, hostsfile
from control.config import HostsSource
from fastfwd import frames
from fastfwd.errors import ConfigError

HOST_IP = ipaddress.IPv4Address("192.168.251.2")

HOSTS = """\
# the host's hosts file
127.0.0.1   localhost app.dev.test   # the app runs on the host
127.0.1.1   laptop
::1         localhost ip6-localhost v6.dev.test
fe80::1%eth0 link.dev.test
10.0.0.5    db.dev.test DB2.Dev.Test. other.test
10.0.0.6    fakedev.test dev.test
10.0.0.7    db.dev.test
not-an-ip   bad.dev.test
10.0.0.8
10.0.0.9    bad,name.dev.test ok.dev.test
"""


def test_suffix_matches_on_label_boundaries_only():
    assert hostsfile.matches_suffix("a.dev.test", "dev.test")
    assert hostsfile.matches_suffix("a.b.dev.test", "dev.test")
    assert hostsfile.matches_suffix("dev.test", "dev.test")
    assert hostsfile.matches_suffix("A.Dev.Test.", ".dev.test")
    assert not hostsfile.matches_suffix("fakedev.test", "dev.test")
    assert not hostsfile.matches_suffix("dev.test.evil", "dev.test")
    assert not hostsfile.matches_suffix("test", "dev.test")


def test_hosts_file_parsing_skips_comments_ipv6_and_bad_lines():
    entries = hostsfile.parse_hosts(HOSTS)
    ips = [str(ip) for ip, _ in entries]
    assert ips == [
        "127.0.0.1",
        "127.0.1.1",
        "10.0.0.5",
        "10.0.0.6",
        "10.0.0.7",
        "10.0.0.9",
    ]
    assert entries[0][1] == ["localhost", "app.dev.test"]
    # lowercased, trailing dot dropped; a name with a comma is left out
    assert entries[2][1] == ["db.dev.test", "db2.dev.test", "other.test"]
    assert entries[5][1] == ["ok.dev.test"]


def test_selection_maps_loopback_to_the_host_tunnel_ip_and_first_line_wins():
    chosen = hostsfile.select(hostsfile.parse_hosts(HOSTS), ("dev.test",), HOST_IP)
    assert chosen == {
        "app.dev.test": HOST_IP,
        "db.dev.test": ipaddress.IPv4Address("10.0.0.5"),  # not 10.0.0.7
        "db2.dev.test": ipaddress.IPv4Address("10.0.0.5"),
        "dev.test": ipaddress.IPv4Address("10.0.0.6"),
        "ok.dev.test": ipaddress.IPv4Address("10.0.0.9"),
    }
    assert "fakedev.test" not in chosen and "localhost" not in chosen


def test_host_commands_group_names_by_address_in_file_order():
    chosen = hostsfile.select(hostsfile.parse_hosts(HOSTS), ("dev.test",), HOST_IP)
    assert hostsfile.host_commands(chosen) == [
        ("host", "192.168.251.2", "app.dev.test"),
        ("host", "10.0.0.5", "db.dev.test", "db2.dev.test"),
        ("host", "10.0.0.6", "dev.test"),
        ("host", "10.0.0.9", "ok.dev.test"),
    ]


def run(coro):
    return asyncio.run(coro)


def test_names_push_dns_then_hosts_and_retire_a_dropped_suffix(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 app.dev.test\n10.0.0.5 db.other.test\n")

    async def scenario():
        names = hostsfile.HostsNames(str(tmp_path / "fastfwd.conf"), lambda: None)
        try:
            # relative to the configuration file's directory
            assert names.configure(
                [HostsSource("hosts", ("dev.test", "other.test"))], HOST_IP
            )
            first = names.commands()
            assert not names.configure(
                [HostsSource("hosts", ("dev.test", "other.test"))], HOST_IP
            )
            assert names.configure([HostsSource("hosts", ("dev.test",))], HOST_IP)
            second = names.commands()
            assert not names.configure([HostsSource("hosts", ("dev.test",))], HOST_IP)
            assert names.configure([], HOST_IP)
            third = names.commands()
            return first, second, third
        finally:
            names.close()

    first, second, third = run(scenario())
    assert first == [
        ("dns", "dev.test", "other.test"),
        ("host", "192.168.251.2", "app.dev.test"),
        ("host", "10.0.0.5", "db.other.test"),
    ]
    assert second == [
        ("dns", "-other.test", "dev.test"),
        ("host", "192.168.251.2", "app.dev.test"),
    ]
    assert third == [("dns", "-dev.test", "-other.test")]
    body = frames.encode_commands(first).decode()
    assert body == (
        "dns dev.test other.test,"
        "host 192.168.251.2 app.dev.test,"
        "host 10.0.0.5 db.other.test"
    )


def test_names_follow_an_edited_hosts_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 app.dev.test old.dev.test\n")

    async def scenario():
        changed = asyncio.Event()
        names = hostsfile.HostsNames(None, changed.set)
        try:
            names.configure([HostsSource(str(hosts), ("dev.test",))], HOST_IP)
            await asyncio.sleep(0.3)  # the watcher is up
            tmp = tmp_path / "hosts.new"
            tmp.write_text("127.0.0.1 app.dev.test\n10.0.0.7 new.dev.test\n")
            tmp.replace(hosts)  # an editor's save
            await asyncio.wait_for(changed.wait(), 10)
            return names.commands()
        finally:
            names.close()

    assert run(scenario()) == [
        ("dns", "dev.test"),
        ("host", "192.168.251.2", "app.dev.test"),
        ("host", "10.0.0.7", "new.dev.test"),
    ]


def test_an_unreadable_hosts_file_still_serves_its_suffixes(tmp_path):
    async def scenario():
        names = hostsfile.HostsNames(None, lambda: None)
        try:
            names.configure(
                [HostsSource(str(tmp_path / "missing"), ("dev.test",))], HOST_IP
            )
            return names.commands()
        finally:
            names.close()

    assert run(scenario()) == [("dns", "dev.test")]


def test_names_beyond_the_control_body_budget_are_left_out(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "".join(
            f"10.{i >> 8 & 255}.{i & 255}.1 host{i}.dev.test\n" for i in range(3000)
        )
    )

    async def scenario():
        names = hostsfile.HostsNames(None, lambda: None)
        try:
            names.configure([HostsSource(str(hosts), ("dev.test",))], HOST_IP)
            return names.commands()
        finally:
            names.close()

    commands = run(scenario())
    assert 1 < len(commands) < 3001
    assert len(frames.encode_commands(commands)) <= hostsfile.NAMES_BUDGET_BYTES


def test_hosts_line_refuses_a_suffix_the_wire_would_misread():
    cfg = config.parse_text("hosts /etc/hosts .Dev.Test. b.test\n", "t.conf")
    assert cfg.hosts == [HostsSource("/etc/hosts", ("dev.test", "b.test"))]
    for bad in ("-dev.test", "a..b", "a,b", "x-.test"):
        with pytest.raises(ConfigError):
            config.parse_text(f"hosts /etc/hosts {bad}\n", "t.conf")
