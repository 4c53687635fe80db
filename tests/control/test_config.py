import ipaddress

import pytest

from control import config
from fastfwd.errors import ConfigError


def parse(text):
    return config.parse_text(text, "test.conf")


def test_defaults_match_the_upstream():
    cfg = parse("")
    assert str(cfg.addr) == "192.168.251.1/24"
    assert (cfg.port, cfg.host, cfg.mtu) == (2511, "127.0.0.1", 1400)
    assert str(cfg.host_ip) == "192.168.251.2"
    assert str(cfg.vm_ip) == "192.168.251.1"


def test_every_upstream_directive_parses_into_typed_values():
    cfg = parse(
        "addr 10.77.0.1/24\n"
        "port 2600\n"
        "host 0.0.0.0\n"
        "mtu 1300\n"
        "route 172.18.0.0/16 expose\n"
        "route 172.19.0.0/16\n"
        "iptables 172.18.0.0+172.19.0.0\n"
        "expose 0.0.0.0:2512 restart\n"
        "token alice 10.77.0.10\n"
        "hosts /etc/hosts .dev.test example.test\n"
        "proxy 127.0.0.1:8080:80\n"
        "proxy 5432\n"
        "loglevel debug\n"
        "pong on\n"
    )
    assert cfg.addr == ipaddress.IPv4Interface("10.77.0.1/24")
    assert cfg.port == 2600 and cfg.host == "0.0.0.0" and cfg.mtu == 1300
    assert cfg.routes[ipaddress.IPv4Network("172.18.0.0/16")].expose
    assert not cfg.routes[ipaddress.IPv4Network("172.19.0.0/16")].expose
    assert cfg.connected_pairs() == [("172.18.0.0", "172.19.0.0")]
    assert cfg.expose == config.Expose("0.0.0.0", 2512, True)
    assert cfg.tokens == {"alice": ipaddress.IPv4Address("10.77.0.10")}
    assert cfg.hosts == [config.HostsSource("/etc/hosts", ("dev.test", "example.test"))]
    assert config.Proxy("127.0.0.1", 8080, 80) in cfg.proxies
    assert config.Proxy(None, 5432, 5432) in cfg.proxies
    assert cfg.loglevel == "DEBUG" and cfg.pong


def test_comments_tabs_and_repeated_spaces_are_accepted():
    cfg = parse(
        "# a comment\n\troute\t 172.18.0.0/16   # trailing\n\n   \nmtu    1200\n"
    )
    assert list(cfg.routes) == [ipaddress.IPv4Network("172.18.0.0/16")]
    assert cfg.mtu == 1200


def test_later_iptables_line_overrides_earlier_for_the_same_pair():
    cfg = parse("iptables 172.18.0.0+172.19.0.0\niptables 172.19.0.0-172.18.0.0\n")
    assert cfg.connected_pairs() == []
    assert cfg.disconnected_pairs() == [("172.19.0.0", "172.18.0.0")]


def test_every_bad_line_is_reported_with_its_number():
    text = (
        "route 172.18.0.0/16\n"
        "route not-a-network\n"
        "mtu 99999\n"
        "# fine\n"
        "frobnicate yes\n"
        "iptables 172.18.0.0*172.19.0.0\n"
        "token a 192.168.251.5\n"
        "token b 192.168.251.5\n"
        "port\n"
    )
    with pytest.raises(ConfigError) as err:
        parse(text)
    lines = [n for _, n, _ in err.value.problems]
    assert lines == [2, 3, 5, 6, 8, 9]
    formatted = config.format_problems(err.value.problems)
    assert formatted[0].startswith("test.conf:2: ")
    assert "unknown directive 'frobnicate'" in formatted[2]


def test_default_route_and_host_routes_are_refused():
    with pytest.raises(ConfigError):
        parse("route 0.0.0.0/0\n")


def test_mtu_must_fit_the_upstream_buffers():
    with pytest.raises(ConfigError):
        parse("mtu 2000\n")
    assert parse("mtu 1999\n").mtu == 1999


def test_parse_on_a_base_keeps_the_base_untouched():
    base = parse("route 172.18.0.0/16\n")
    new = config.parse_text("route 172.20.0.0/16\n", "<line>", base=base)
    assert len(base.routes) == 1 and len(new.routes) == 2


def test_restart_changes_lists_restart_only_directives():
    old, new = parse("mtu 1400\nroute 172.18.0.0/16\n"), parse("mtu 1300\n")
    assert config.restart_changes(old, new) == ["mtu"]


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.parse(str(tmp_path / "missing.conf"))
    assert "cannot read" in str(err.value)


def test_numbers_are_plain_ascii_digits():
    for bad in ("1_400", "+1400", "1\u0664\u0660\u0660", " 1400x"):
        with pytest.raises(ConfigError):
            parse(f"mtu {bad}\n")


def test_unusual_line_breaks_do_not_hide_a_second_directive():
    with pytest.raises(ConfigError):
        parse("route 10.62.0.0/16\u2028udp-config on\n")
    with pytest.raises(ConfigError):
        parse("route 10.62.0.0/16\x1cudp-config on\n")
    cfg = parse("route 10.62.0.0/16\r\nmtu 1300\r\n")  # CRLF files are fine
    assert cfg.mtu == 1300


def test_route_with_host_bits_set_is_refused_with_the_network_named():
    with pytest.raises(ConfigError) as err:
        parse("route 172.18.0.1/16\n")
    assert "172.18.0.0/16" in err.value.problems[0][2]


def test_token_ips_and_the_expose_port_are_checked_across_lines():
    text = (
        "token far 10.0.0.5\n"
        "token vm 192.168.251.1\n"
        "token host 192.168.251.2\n"
        "token bcast 192.168.251.255\n"
        "token fine 192.168.251.9\n"
        "expose 0.0.0.0:2511\n"
        "addr 192.168.251.1/24\n"
    )
    with pytest.raises(ConfigError) as err:
        parse(text)
    problems = {n: reason for _, n, reason in err.value.problems}
    assert sorted(problems) == [1, 2, 3, 4, 6]
    assert "outside the tunnel network" in problems[1]
    assert "VM side" in problems[2] and "host's tunnel address" in problems[3]
    assert "tunnel's own UDP port" in problems[6]
    cfg = parse("expose 0.0.0.0:2512 restart\ntoken fine 192.168.251.9\npong on\n")
    assert cfg.expose == config.Expose("0.0.0.0", 2512, True) and cfg.pong


def test_exposed_routes_must_fit_the_upstream_login_answer():
    many = "\n".join(f"route 10.{i // 200}.{i % 200}.0/24 expose" for i in range(130))
    with pytest.raises(ConfigError) as err:
        parse(many + "\n")
    assert "login answer" in err.value.problems[0][2]
    parse("\n".join(f"route 10.{i}.0.0/16 expose" for i in range(60)) + "\n")


def test_a_half_iptables_pair_names_the_expected_form():
    with pytest.raises(ConfigError) as err:
        parse("iptables 172.18.0.0+\n")
    ((_, line, reason),) = err.value.problems
    assert line == 1 and "expected A+B or A-B" in reason
    assert "172.18.0.0+172.19" in reason


def test_steering_is_on_unless_switched_off_and_needs_a_restart():
    assert parse("").steering is True
    assert parse("steering off\n").steering is False
    with pytest.raises(ConfigError) as exc:
        parse("workers 1\nsteering maybe\n")
    assert exc.value.problems == [
        ("test.conf", 2, "steering 'maybe': expected on or off")
    ]
    assert config.restart_changes(parse(""), parse("steering off\n")) == ["steering"]
