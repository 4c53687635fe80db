"""The configuration file: one directive per line, ``#`` starts a comment.

The file is the upstream's: ``addr``, ``port``, ``host``, ``mtu``, ``route``,
``iptables``, ``expose``, ``token``, ``hosts``, ``proxy``, ``loglevel`` and
``pong`` keep their meaning, and a file is read like the upstream's
append-only log, where a later line overrides an earlier one. fastfwd's own
directives follow the same style (see docs/configuration.md).

Parsing is all or nothing: :func:`parse` returns a :class:`Config` or raises
:class:`ConfigError` listing every bad line, so a reload never applies half
a file.
"""

import copy
import ipaddress
import os
import re
from dataclasses import dataclass, field

from fastfwd.errors import ConfigError
from fastfwd.linux import valid_ifname

DEFAULT_ADDR = "192.168.251.1/24"
DEFAULT_PORT = 2511
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MTU = 1400
MIN_MTU = 576
# Both upstream sides read into 2000-byte buffers.
MAX_MTU = 1999
DEFAULT_STATE = "/var/lib/fastfwd/host.state"
DEFAULT_SOCKET = "/run/fastfwd/host.sock"
DEFAULT_DEV = "fastfwd0"
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# A ``hosts`` suffix: dot-separated labels of letters, digits, "_" and "-",
# none starting or ending with "-".
_DOMAIN = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*")

_FIELDS = re.compile(r"[ \t]+")

# Directives that need a restart of the host side to change.
RESTART_ONLY = (
    "addr",
    "port",
    "host",
    "mtu",
    "workers",
    "state",
    "socket",
    "dev",
    "offload",
    "steering",
)


@dataclass(frozen=True)
class Route:
    network: ipaddress.IPv4Network
    expose: bool = False
    force: bool = False  # install even if it overlaps a route of the host's


@dataclass(frozen=True)
class Expose:
    host: str
    port: int
    restart: bool = False


@dataclass(frozen=True)
class HostsSource:
    path: str
    suffixes: tuple


@dataclass(frozen=True)
class Proxy:
    """``proxy [IP:]PORT[:LISTEN]``: connections to the host's tunnel IP on
    port LISTEN (default PORT) are relayed to IP:PORT on the host (IP
    defaults to 127.0.0.1, a service bound to the host's loopback)."""

    ip: str | None  # None: 127.0.0.1
    port: int
    listen: int


@dataclass
class Config:
    """A parsed configuration; every field holds a typed value."""

    path: str | None = None
    addr: ipaddress.IPv4Interface = ipaddress.IPv4Interface(DEFAULT_ADDR)
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    mtu: int = DEFAULT_MTU
    routes: dict = field(default_factory=dict)  # IPv4Network -> Route
    pairs: dict = field(default_factory=dict)  # (A, B) -> True (connect) / False
    expose: Expose | None = None
    tokens: dict = field(default_factory=dict)  # name -> IPv4Address
    hosts: list = field(default_factory=list)
    proxies: list = field(default_factory=list)
    loglevel: str = "INFO"
    pong: bool = False
    workers: int | str = 1
    state: str = DEFAULT_STATE
    socket: str = DEFAULT_SOCKET
    dev: str = DEFAULT_DEV
    udp_config: bool = False
    offload: bool = True
    steering: bool = True
    docker_routes: bool = False
    secret: str | None = None
    lines: dict = field(default_factory=dict)  # directive -> last line number

    @property
    def vm_ip(self):
        """The VM side's tunnel address (``addr`` itself)."""
        return self.addr.ip

    @property
    def host_ip(self):
        """The host's tunnel address: the one after ``addr``."""
        return self.addr.ip + 1

    def connected_pairs(self):
        """Pairs of subnets that must reach each other, in file order."""
        return [p for p, on in self.pairs.items() if on]

    def disconnected_pairs(self):
        return [p for p, on in self.pairs.items() if not on]


def _ipv4(text, what):
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IPv4 address") from None


def _network(text, what):
    try:
        net = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IPv4 network (CIDR)") from None
    if str(net.network_address) != text.split("/")[0] and "/" in text:
        raise ValueError(f"{what} {text!r} has host bits set; the network is {net}")
    return net


def _int(text, what, lo, hi):
    # int() would also take "1_400", "+1400" and non-ASCII digits.
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"{what} {text!r} is not a number")
    value = int(text, 10)
    if not lo <= value <= hi:
        raise ValueError(f"{what} {value} is outside {lo}..{hi}")
    return value


def _nargs(args, lo, hi, usage):
    if not lo <= len(args) <= hi:
        raise ValueError(f"expected: {usage}")


def _subnet_address(text):
    """An ``iptables`` operand: a subnet address, with or without a mask."""
    if "/" in text:
        return _network(text, "subnet").network_address
    return _ipv4(text, "subnet address")


def _apply(cfg, directive, args):
    """Apply one directive to ``cfg``; raises ValueError with the reason."""
    if directive == "addr":
        _nargs(args, 1, 1, "addr CIDR")
        if "/" not in args[0]:
            raise ValueError(
                f"addr {args[0]!r} needs a prefix length, e.g. {args[0]}/24"
            )
        try:
            iface = ipaddress.IPv4Interface(args[0])
        except ValueError:
            raise ValueError(
                f"addr {args[0]!r} is not an IPv4 address with a prefix"
            ) from None
        net = iface.network
        if (
            iface.network.prefixlen > 30
            or iface.ip + 1 not in net
            or iface.ip + 1 == net.broadcast_address
        ):
            raise ValueError(
                f"addr {args[0]}: the next address must fit in the network"
            )
        if iface.ip == net.network_address:
            raise ValueError(f"addr {args[0]} is the network address")
        cfg.addr = iface
    elif directive == "port":
        _nargs(args, 1, 1, "port N")
        cfg.port = _int(args[0], "port", 1, 65535)
    elif directive == "host":
        _nargs(args, 1, 1, "host IP")
        cfg.host = str(_ipv4(args[0], "host"))
    elif directive == "mtu":
        _nargs(args, 1, 1, "mtu N")
        cfg.mtu = _int(args[0], "mtu", MIN_MTU, MAX_MTU)
    elif directive == "route":
        _nargs(args, 1, 3, "route CIDR [expose] [force]")
        net = _network(args[0], "route")
        flags = set(args[1:])
        if not flags <= {"expose", "force"}:
            raise ValueError(
                f"route: unknown option {sorted(flags - {'expose', 'force'})[0]!r}"
            )
        if net.prefixlen == 0:
            raise ValueError("route 0.0.0.0/0 would take the default route")
        cfg.routes[net] = Route(net, "expose" in flags, "force" in flags)
    elif directive == "iptables":
        _nargs(args, 1, 1, "iptables A+B or iptables A-B")
        spec = args[0]
        for sign, on in (("+", True), ("-", False)):
            if sign in spec:
                a, _, b = spec.partition(sign)
                break
        else:
            raise ValueError(f"iptables {spec!r}: expected A+B or A-B")
        try:
            a, b = _subnet_address(a), _subnet_address(b)
        except ValueError as exc:
            raise ValueError(
                f"iptables {spec!r}: expected A+B or A-B with two subnet "
                f"addresses, e.g. 172.18.0.0+172.19.0.0 ({exc})"
            ) from None
        if a == b:
            raise ValueError(f"iptables {spec!r}: both sides are the same subnet")
        key = (str(a), str(b))
        rev = (key[1], key[0])
        cfg.pairs.pop(rev, None)
        cfg.pairs.pop(key, None)
        cfg.pairs[key] = on
    elif directive == "expose":
        _nargs(args, 1, 2, "expose ADDR:PORT [restart]")
        host, sep, port = args[0].rpartition(":")
        if not sep:
            raise ValueError(f"expose {args[0]!r}: expected ADDR:PORT")
        if len(args) == 2 and args[1] != "restart":
            raise ValueError(f"expose: unknown option {args[1]!r}")
        cfg.expose = Expose(
            str(_ipv4(host or "0.0.0.0", "expose address")),
            _int(port, "expose port", 1, 65535),
            len(args) == 2,
        )
    elif directive == "token":
        _nargs(args, 2, 2, "token NAME IP")
        if len(args[0].encode("utf-8")) > 512:
            raise ValueError("token: a token has at most 512 bytes")
        ip = _ipv4(args[1], "token IP")
        for other, other_ip in cfg.tokens.items():
            if other_ip == ip and other != args[0]:
                raise ValueError(f"token IP {ip} is already given to another token")
        cfg.tokens[args[0]] = ip
    elif directive == "hosts":
        _nargs(args, 2, 64, "hosts FILE SUFFIX...")
        suffixes = tuple(s.strip(".").lower() for s in args[1:])
        for suffix in suffixes:
            # A leading "-" would read as "stop serving" on the wire.
            if not _DOMAIN.fullmatch(suffix):
                raise ValueError(f"hosts: suffix {suffix!r} is not a domain name")
        cfg.hosts.append(HostsSource(args[0], suffixes))
    elif directive == "proxy":
        _nargs(args, 1, 1, "proxy [IP:]PORT[:LISTEN]")
        parts = args[0].split(":")
        ip = None
        if len(parts) > 1 and "." in parts[0]:
            ip = str(_ipv4(parts.pop(0), "proxy address"))
        if not 1 <= len(parts) <= 2:
            raise ValueError(f"proxy {args[0]!r}: expected [IP:]PORT[:LISTEN]")
        port = _int(parts[0], "proxy port", 1, 65535)
        listen = (
            _int(parts[1], "proxy listen port", 1, 65535) if len(parts) == 2 else port
        )
        cfg.proxies = [p for p in cfg.proxies if p.listen != listen]
        cfg.proxies.append(Proxy(ip, port, listen))
    elif directive == "loglevel":
        _nargs(args, 1, 1, "loglevel LEVEL")
        level = args[0].upper()
        if level not in LOGLEVELS:
            raise ValueError(
                f"loglevel {args[0]!r}: expected one of {', '.join(LOGLEVELS)}"
            )
        cfg.loglevel = level
    elif directive in ("pong", "udp-config", "offload", "docker-routes", "steering"):
        _nargs(args, 1, 1, f"{directive} on|off")
        if args[0] not in ("on", "off"):
            raise ValueError(f"{directive} {args[0]!r}: expected on or off")
        setattr(cfg, directive.replace("-", "_"), args[0] == "on")
    elif directive == "workers":
        _nargs(args, 1, 1, "workers N|auto")
        cfg.workers = "auto" if args[0] == "auto" else _int(args[0], "workers", 1, 64)
    elif directive in ("state", "socket"):
        _nargs(args, 1, 1, f"{directive} PATH")
        if not os.path.isabs(args[0]):
            raise ValueError(f"{directive} {args[0]!r}: expected an absolute path")
        setattr(cfg, directive, args[0])
    elif directive == "secret":
        _nargs(args, 1, 1, "secret STRING")
        if len(args[0]) < 16:
            raise ValueError("secret: use at least 16 characters")
        cfg.secret = args[0]
    elif directive == "dev":
        _nargs(args, 1, 1, "dev NAME")
        if not valid_ifname(args[0]):
            raise ValueError(
                f"dev {args[0]!r} is not a valid interface name (1-15 characters)"
            )
        cfg.dev = args[0]
    else:
        raise ValueError(f"unknown directive {directive!r}")


def parse_text(text, path="<config>", base=None):
    """Parse configuration text; ``base`` is a Config the lines extend."""
    cfg = Config(path=path) if base is None else copy.deepcopy(base)
    problems = []
    token_lines = {}
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    # Lines end at "\n" only, and fields are split on spaces and tabs only:
    # str.splitlines() and str.split() would also break at "\r", "\x1c",
    # "\u2028" and friends, so one visible line could hide two directives.
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0].strip(" \t\r")
        if not line:
            continue
        directive, *args = _FIELDS.split(line)
        try:
            _apply(cfg, directive.lower(), args)
        except ValueError as exc:
            problems.append((path, number, str(exc)))
            continue
        cfg.lines[directive.lower()] = number
        if directive.lower() == "token":
            token_lines[args[0]] = number
    problems += _cross_check(cfg, path, token_lines)
    problems.sort(key=lambda p: p[1])  # in file order, whatever found them
    if problems:
        raise ConfigError(f"{path}: {len(problems)} invalid line(s)", problems)
    return cfg


def token_ip_problem(cfg, ip):
    """Why ``ip`` cannot be an accessor's address in ``cfg``'s tunnel
    network, or None."""
    net = cfg.addr.network
    taken = {
        cfg.vm_ip: "the VM side's tunnel address",
        cfg.host_ip: "the host's tunnel address",
        net.network_address: "the network address",
        net.broadcast_address: "the broadcast address",
    }
    if ip not in net:
        return f"token IP {ip} is outside the tunnel network {net}"
    if ip in taken:
        return f"token IP {ip} is {taken[ip]}"
    return None


def _cross_check(cfg, path, token_lines):
    """Problems between directives, whatever their order: every token's IP
    must be a free address of the tunnel network, and the expose port
    cannot be the tunnel's own."""
    problems = []
    for name, ip in cfg.tokens.items():
        reason = token_ip_problem(cfg, ip)
        if reason:
            problems.append((path, token_lines.get(name, 0), reason))
    exposed = tuple(str(r.network) for r in cfg.routes.values() if r.expose)
    if exposed:
        # The upstream accessor reads its login answer into 2000 bytes.
        from fastfwd.frames import Session, UPSTREAM_BUFFER_BYTES, encode_session

        net = cfg.addr.network
        longest = f"{net.broadcast_address}/{net.prefixlen}"
        answer = encode_session(Session(longest, str(cfg.host_ip), cfg.mtu, exposed))
        if len(answer) > UPSTREAM_BUFFER_BYTES:
            problems.append(
                (path, cfg.lines.get("route", 0),
                 f"{len(exposed)} exposed routes make a {len(answer)}-byte login answer; "
                 f"an accessor takes at most {UPSTREAM_BUFFER_BYTES}: expose fewer, wider networks")
            )  # fmt: skip
    e = cfg.expose
    if e is not None and e.port == cfg.port and (
        e.host == cfg.host or "0.0.0.0" in (e.host, cfg.host)
    ):
        problems.append(
            (path, cfg.lines.get("expose", 0),
             f"expose {e.host}:{e.port} is the tunnel's own UDP port; choose another")
        )  # fmt: skip
    return problems


def parse(path):
    """Read and parse the configuration file at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read configuration {path}: {exc.strerror}",
            [(path, 0, f"cannot read: {exc.strerror}")],
        ) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text", [(path, line, "not UTF-8 text")]
        ) from exc
    return parse_text(text, path)


def format_problems(problems):
    """Problems as ``FILE:LINE: reason`` lines (``FILE: reason`` for the
    whole file)."""
    return [
        f"{p}:{n}: {reason}" if n else f"{p}: {reason}" for p, n, reason in problems
    ]


def restart_changes(old, new):
    """Restart-only directives whose value differs between two configs."""
    return [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
