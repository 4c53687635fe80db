"""The ``fastfwd`` command line.

Errors the user can fix are one line on stderr and an exit code: 1 for a
runtime failure, 2 for a bad configuration or usage, 3 for a set-up failure
(privileges, device, port). Anything else is a bug and shows a traceback.
"""

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys

from control import config as cfgmod
from control import localsock
from fastfwd import endpoints, linux, logsetup
from fastfwd.errors import EXIT_CONFIG, ConfigError, FastfwdError, TransportError
from fastfwd.supervisor import Supervisor

DEFAULT_CONFIG = "/etc/fastfwd/fastfwd.conf"
VM_SOCKET = "/run/fastfwd/vm.sock"
ACCESS_SOCKET = "/run/fastfwd/access.sock"


def build_parser():
    p = argparse.ArgumentParser(
        prog="fastfwd",
        description="Reach containers inside a VM by IP through a UDP/TUN tunnel "
        "(wire-compatible with desktop-docker-connector).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="host side: TUN server routing the docker subnets")
    run.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        help=f"configuration file (default {DEFAULT_CONFIG})",
    )
    run.add_argument(
        "--workers",
        help="worker count, N or auto (default: the workers directive, else 1)",
    )
    run.add_argument("--state", help="peer state file (overrides the state directive)")
    run.add_argument("--socket", help="control socket (overrides the socket directive)")
    run.add_argument("--dev", help="TUN device name (overrides the dev directive)")
    run.add_argument(
        "--loglevel",
        type=str.upper,
        choices=cfgmod.LOGLEVELS,
        help="log level (overrides the loglevel directive)",
    )
    run.add_argument(
        "--offload",
        choices=("on", "off"),
        help="carry TCP super-packets whole with a fastfwd peer (overrides the offload directive)",
    )
    run.add_argument(
        "--steering",
        choices=("on", "off"),
        help="pin each writer to a CPU and steer the kernel's work on its packets "
        "to the others (overrides the steering directive)",
    )

    con = sub.add_parser(
        "connect",
        help="VM side: dial the host and inject its packets into the VM's network",
        description="Flags keep the upstream container's names: -host, -port, -addr and -mtu "
        "work as well as --host, --port, --addr and --mtu.",
    )
    con.add_argument(
        "-host",
        "--host",
        default="host.docker.internal",
        help="host running `fastfwd run` (default host.docker.internal)",
    )
    con.add_argument(
        "-port",
        "--port",
        type=int,
        default=cfgmod.DEFAULT_PORT,
        help="its UDP port (default 2511)",
    )
    con.add_argument(
        "-addr",
        "--addr",
        default=cfgmod.DEFAULT_ADDR,
        help="tunnel address of this side, with prefix (default 192.168.251.1/24)",
    )
    con.add_argument(
        "-mtu",
        "--mtu",
        type=int,
        default=cfgmod.DEFAULT_MTU,
        help="TUN MTU, same on both sides (default 1400)",
    )
    con.add_argument(
        "--dev", default="fastfwd0", help="TUN device name (default fastfwd0)"
    )
    con.add_argument(
        "--socket", default=VM_SOCKET, help=f"control socket (default {VM_SOCKET})"
    )
    con.add_argument(
        "--workers", default="1", help="worker count, N or auto (default 1)"
    )
    con.add_argument(
        "--no-firewall",
        action="store_true",
        help="leave iptables alone (no Docker rules, no connect/disconnect)",
    )
    con.add_argument(
        "--offload",
        choices=("on", "off"),
        default="on",
        help="carry TCP super-packets whole when the host is fastfwd too (default on)",
    )
    _add_steering(con)
    con.add_argument(
        "--secret-file",
        help="file holding the secret of the host's secret directive (or set FASTFWD_SECRET)",
    )
    _add_loglevel(con)

    acc = sub.add_parser(
        "access",
        help="accessor: log in to a host's expose port and route its exposed networks",
        description="Logs in to the expose port of a fastfwd (or desktop-docker-connector) "
        "host with a token, gives a TUN the address the host assigns and routes the "
        "networks it exposes into it. Flags keep the upstream accessor's names: -remote, "
        "-token, -exclude and -debug work as well as --remote, --token, --exclude and "
        "--debug. The token can also come from --token-file or FASTFWD_TOKEN, which keeps "
        "it out of the process list.",
    )
    acc.add_argument(
        "-remote", "--remote", required=True, metavar="HOST:PORT",
        help="the host's expose address",
    )  # fmt: skip
    acc.add_argument("-token", "--token", help="the token the host assigned you")
    acc.add_argument("--token-file", help="file holding the token")
    acc.add_argument(
        "-exclude", "--exclude", default="", metavar="CIDR,...",
        help="exposed networks not to route here (they clash with local ones)",
    )  # fmt: skip
    acc.add_argument(
        "--dev", default="fastfwd-acc", help="TUN device name (default fastfwd-acc)"
    )
    acc.add_argument(
        "--socket", default=ACCESS_SOCKET,
        help=f"control socket for status (default {ACCESS_SOCKET})",
    )  # fmt: skip
    acc.add_argument("-debug", "--debug", action="store_true", help="log level DEBUG")
    _add_steering(acc)
    _add_loglevel(acc)

    cfg = sub.add_parser(
        "config", help="add configuration lines to a running host side"
    )
    cfg.add_argument(
        "lines",
        nargs="+",
        metavar="LINE",
        help='a directive, e.g. "route 172.20.0.0/16"',
    )
    cfg.add_argument(
        "--socket",
        default=cfgmod.DEFAULT_SOCKET,
        help=f"control socket (default {cfgmod.DEFAULT_SOCKET})",
    )

    st = sub.add_parser(
        "status",
        help="packets, drops, CPU, memory and CPUs of each process of a running instance",
    )
    st.add_argument(
        "--socket",
        help=f"control socket (default {cfgmod.DEFAULT_SOCKET}, then {VM_SOCKET})",
    )
    st.add_argument("--json", action="store_true", help="print JSON")

    tune = sub.add_parser(
        "tune",
        help="probe modes and worker counts in a lab on this machine, recommend settings",
        description="Builds a lab of network namespaces (as root; needs iperf3), runs short "
        "iperf3 probes through fastfwd in each mode and worker count (and offload with "
        "steering off), and recommends the workers, offload and steering directives; "
        "--write appends them to a configuration file.",
    )
    tune.add_argument(
        "--seconds",
        type=int,
        default=10,
        help="length of each probe; shorter ones are mostly noise (default 10)",
    )
    tune.add_argument(
        "--max-workers",
        type=int,
        help="largest worker count to try (default: usable CPUs)",
    )
    tune.add_argument(
        "--write",
        metavar="CONF",
        help="append the recommendation to this configuration file",
    )

    chk = sub.add_parser("check", help="validate a configuration file")
    chk.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        help=f"configuration file (default {DEFAULT_CONFIG})",
    )
    return p


def _add_loglevel(parser):
    """``--loglevel`` of the commands that take no configuration file."""
    parser.add_argument(
        "--loglevel",
        type=str.upper,
        choices=cfgmod.LOGLEVELS,
        default=logsetup.env_level().upper(),
        help="log level (default INFO)",
    )


def _add_steering(parser):
    parser.add_argument(
        "--steering",
        choices=("on", "off"),
        default="on",
        help="pin each writer to a CPU and steer the kernel's work on its packets "
        "to the others (default on)",
    )


def _workers(value):
    if value in (None, ""):
        return None
    if value == "auto":
        import psutil

        return max(1, min(len(psutil.Process().cpu_affinity()), 8))
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--workers {value!r}: expected a number or auto") from None
    if not 1 <= n <= 64:
        raise ConfigError(f"--workers {n} is outside 1..64")
    return n


def cmd_check(args):
    try:
        cfg = cfgmod.parse(args.config)
    except ConfigError as exc:
        for line in cfgmod.format_problems(exc.problems):
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"{args.config}: ok (routes: {len(cfg.routes)}, connected subnet pairs: "
        f"{len(cfg.connected_pairs())}, tokens: {len(cfg.tokens)})"
    )
    return 0


def cmd_run(args):
    try:
        cfg = cfgmod.parse(args.config)
    except ConfigError as exc:
        raise ConfigError(
            f"not started: {args.config} is invalid", exc.problems
        ) from exc
    overrides = {}
    for key in ("state", "socket", "dev", "loglevel"):
        value = getattr(args, key)
        if value:
            overrides[key] = value.upper() if key == "loglevel" else value
            setattr(cfg, key, overrides[key])
    if not linux.valid_ifname(cfg.dev):
        raise ConfigError(f"--dev {cfg.dev!r} is not a valid interface name")
    if args.offload:
        cfg.offload = overrides["offload"] = args.offload == "on"
    if args.steering:
        cfg.steering = overrides["steering"] = args.steering == "on"
    workers = _workers(args.workers) or _workers(str(cfg.workers))
    logsetup.setup("supervisor", cfg.loglevel)
    localsock.claim(cfg.socket)  # before any device is made
    tun_fds, name, vnet = endpoints.open_tun(cfg.dev, workers, vnet_hdr=cfg.offload)
    try:
        socks = endpoints.bind_udp(cfg.host, cfg.port, workers)
    except TransportError:
        for fd in tun_fds:
            os.close(fd)
        raise
    control_args = {
        "config": os.path.abspath(args.config),
        "socket": cfg.socket,
        "overrides": overrides,
    }
    sup = Supervisor(
        "host", name, tun_fds, socks, control_args, cfg.loglevel, vnet_hdr=vnet,
        steer=cfg.steering,
    )  # fmt: skip
    return asyncio.run(sup.run())


def cmd_connect(args):
    try:
        if "/" not in args.addr:
            raise ValueError
        addr = ipaddress.IPv4Interface(args.addr)
    except ValueError:
        raise ConfigError(
            f"-addr {args.addr!r} is not an IPv4 address with a prefix (e.g. 192.168.251.1/24)"
        ) from None
    if not cfgmod.MIN_MTU <= args.mtu <= cfgmod.MAX_MTU:
        raise ConfigError(
            f"-mtu {args.mtu} is outside {cfgmod.MIN_MTU}..{cfgmod.MAX_MTU}"
        )
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"-port {args.port} is outside 1..65535")
    if not linux.valid_ifname(args.dev):
        raise ConfigError(f"--dev {args.dev!r} is not a valid interface name")
    workers = _workers(args.workers)
    secret_env = {}
    if args.secret_file:
        try:
            with open(args.secret_file, encoding="utf-8") as f:
                secret_env["FASTFWD_SECRET"] = f.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"--secret-file {args.secret_file}: {exc.strerror}"
            ) from exc
    secret = secret_env.get("FASTFWD_SECRET", os.environ.get("FASTFWD_SECRET", ""))
    if secret and len(secret) < 16:
        raise ConfigError("the secret must have at least 16 characters")
    logsetup.setup("supervisor", args.loglevel)
    try:
        if linux.ensure_tun_node():
            print(f"fastfwd: created {linux.TUN_PATH}", file=sys.stderr)
    except OSError as exc:
        raise FastfwdError(
            f"cannot create {linux.TUN_PATH}: {exc.strerror} (needs CAP_MKNOD or --device /dev/net/tun)"
        ) from exc
    localsock.claim(args.socket)  # before any device is made
    tun_fds, name, vnet = endpoints.open_tun(
        args.dev, workers, vnet_hdr=args.offload == "on"
    )
    try:
        socks = endpoints.dial_udp(workers)
    except TransportError:
        for fd in tun_fds:
            os.close(fd)
        raise
    control_args = {
        "host": args.host, "port": args.port, "addr": str(addr), "mtu": args.mtu,
        "socket": args.socket, "firewall": not args.no_firewall,
    }  # fmt: skip
    sup = Supervisor(
        "vm",
        name,
        tun_fds,
        socks,
        control_args,
        args.loglevel.upper(),
        vnet_hdr=vnet,
        control_env=secret_env,
        steer=args.steering == "on",
    )
    return asyncio.run(sup.run())


def _remote(text):
    """``HOST:PORT`` resolved to an IPv4 address."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise ConfigError(f"-remote {text!r}: expected HOST:PORT")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"-remote {text!r}: port outside 1..65535")
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as exc:
        raise FastfwdError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    return infos[0][4][0], int(port)


def cmd_access(args):
    token = args.token or ""
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: {exc.strerror}") from exc
    token = token or os.environ.get("FASTFWD_TOKEN", "")
    if not token:
        raise ConfigError("a token is needed: -token, --token-file or FASTFWD_TOKEN")
    if len(token.encode("utf-8")) > 512 or any(c.isspace() for c in token):
        raise ConfigError("a token has at most 512 bytes and no spaces")
    exclude = []
    for item in filter(None, (x.strip() for x in args.exclude.split(","))):
        try:
            exclude.append(str(ipaddress.IPv4Network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"-exclude {item!r} is not an IPv4 network") from None
    if not linux.valid_ifname(args.dev):
        raise ConfigError(f"--dev {args.dev!r} is not a valid interface name")
    remote = _remote(args.remote)
    loglevel = "DEBUG" if args.debug else args.loglevel
    logsetup.setup("supervisor", loglevel)
    try:
        if linux.ensure_tun_node():
            print(f"fastfwd: created {linux.TUN_PATH}", file=sys.stderr)
    except OSError as exc:
        raise FastfwdError(f"cannot create {linux.TUN_PATH}: {exc.strerror}") from exc
    localsock.claim(args.socket)  # before any device is made
    tun_fds, name, _ = endpoints.open_tun(args.dev, 1, vnet_hdr=False)
    try:
        socks = endpoints.dial_udp(1)
    except (TransportError, OSError) as exc:
        for fd in tun_fds:
            os.close(fd)
        raise FastfwdError(f"cannot reach {args.remote}: {exc}") from exc
    control_args = {"remote": list(remote), "exclude": exclude, "socket": args.socket}
    sup = Supervisor(
        "access", name, tun_fds, socks, control_args, loglevel,
        control_env={"FASTFWD_TOKEN": token}, steer=args.steering == "on",
    )  # fmt: skip
    return asyncio.run(sup.run())


def _ask(path, payload):
    try:
        return localsock.request(path, payload)
    except FileNotFoundError:
        raise FastfwdError(
            f"no running fastfwd at {path} (is it started? which --socket?)"
        ) from None
    except PermissionError:
        raise FastfwdError(
            f"cannot open {path}: permission denied (run as root)"
        ) from None
    except OSError as exc:
        raise FastfwdError(f"cannot reach {path}: {exc.strerror or exc}") from None


def cmd_status(args):
    paths = (
        [args.socket]
        if args.socket
        else [cfgmod.DEFAULT_SOCKET, VM_SOCKET, ACCESS_SOCKET]
    )
    path = next((p for p in paths if os.path.exists(p)), paths[0])
    reply = _ask(path, {"op": "status"})
    if not reply.get("ok"):
        raise FastfwdError(reply.get("error", "status failed"))
    status = reply["status"]
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def format_status(status):
    lines = [
        f"side {status['side']}  tun {status['tun']}  uptime {status['uptime_s']}s"
    ]
    for key in (
        "address",
        "framing",
        "frame_segment_bytes",
        "peer",
        "peer_silent_s",
        "host",
        "heartbeats",
        "routes",
        "refused_routes",
        "pairs",
        "pending_pairs",
        "networks",
        "docker_networks",
        "control_pushes",
        "peer_mtu",
        "rejected_hellos",
        "remote",
        "logged_in",
        "host_ip",
        "mtu",
        "excluded",
        "logins",
        "relogin_requests",
    ):
        if key in status:
            lines.append(f"{key:15} {_plain(status[key])}")
    for key in ("names", "dns"):
        if status.get(key):
            lines.append(f"{key:15} {_plain(status[key])}")
    expose = status.get("expose") or {}
    if expose.get("listen") or expose.get("error"):
        where = expose.get("listen") or f"not listening: {expose.get('error')}"
        lines.append(
            f"{'expose':15} {where} sessions {len(expose.get('sessions', []))} "
            f"logins {expose.get('logins', 0)} refused {expose.get('refused_logins', 0)}"
        )
        totals = {
            k: sum(p.get("counters", {}).get(k, 0) for p in status["processes"])
            for k in ("to_accessors", "from_accessors", "drops_acl", "pongs")
        }
        lines.append(f"{'accessor pkts':15} {_plain(totals)}")
        for s in expose.get("sessions", []):
            lines.append(f"{'accessor':15} {s['ip']} from {s['from']} token {s['token']}")
    for line, proxy in (status.get("proxies") or {}).items():
        state = (
            "listening"
            if proxy.get("listening")
            else f"not listening: {proxy.get('error')}"
        )
        lines.append(
            f"{'proxy':15} {line} -> {proxy.get('target')} {state} connections {proxy.get('connections', 0)}"
        )
    lines.append(
        f"{'process':9} {'pid':>7} {'pkts_in':>10} {'pkts_out':>10} {'MB_out':>9} "
        f"{'drops':>7} {'cpu_s':>7} {'pss_MB':>7} {'restarts':>8} cpus"
    )
    for p in status["processes"]:
        c = p.get("counters", {})
        drops = sum(v for k, v in c.items() if k.startswith("drops_"))
        pss = p.get("pss_bytes") or p.get("rss_bytes") or 0
        lines.append(
            f"{p['name']:9} {p['pid']:>7} {c.get('pkts_in', 0):>10} {c.get('pkts_out', 0):>10} "
            f"{c.get('bytes_out', 0) / 1e6:>9.1f} {drops:>7} {p.get('cpu_s', 0):>7} "
            f"{pss / 1e6:>7.1f} {p.get('restarts', 0):>8} {_cpu_list(p.get('cpus'))}"
        )
    return "\n".join(lines)


def _cpu_list(cpus):
    """CPU numbers as ranges: [0, 1, 2, 5] -> "0-2,5"."""
    if not cpus:
        return "-"
    parts, start, prev = [], cpus[0], cpus[0]
    for c in [*cpus[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    return ",".join(parts)


def _plain(value):
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def cmd_config(args):
    reply = _ask(args.socket, {"op": "config", "lines": args.lines})
    if not reply.get("ok"):
        for line in reply.get("problems", []):
            print(line, file=sys.stderr)
        print(f"fastfwd: {reply.get('error', 'config failed')}", file=sys.stderr)
        # Bad lines and bad usage (no line at all) are exit 2, as documented.
        usage = reply.get("code") in ("invalid_config", "bad_request")
        return EXIT_CONFIG if usage else 1
    print(reply.get("message", "ok"))
    for warning in reply.get("warnings", []):
        print(f"fastfwd: {warning}", file=sys.stderr)
    # Saved but not (yet) in effect: a script must not take it as done.
    return 1 if reply.get("warnings") else 0


def cmd_tune(args):
    if shutil.which("iperf3") is None:
        raise FastfwdError("tune needs iperf3 (apt-get install iperf3)")
    if os.geteuid() != 0:
        raise FastfwdError("tune builds network namespaces: run it as root")
    if args.write:
        cfgmod.parse(args.write)  # refuse to append to a file that is already invalid
    from perf import tune

    tune.run(args.seconds, args.max_workers, args.write, sys.stdout)
    return 0


COMMANDS = {
    "run": cmd_run, "connect": cmd_connect, "access": cmd_access, "check": cmd_check,
    "status": cmd_status, "config": cmd_config, "tune": cmd_tune,
}  # fmt: skip


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("run", "connect", "access"):
        # Until the supervisor's loop handles it, a SIGHUP must not end the
        # process tree being set up; children inherit the ignore and the
        # control process installs its reload handler over it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        for line in cfgmod.format_problems(exc.problems):
            print(line, file=sys.stderr)
        print(f"fastfwd: {exc}", file=sys.stderr)
        return exc.exit_code
    except FastfwdError as exc:
        print(f"fastfwd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
