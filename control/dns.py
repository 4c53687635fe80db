"""The VM side's name server for containers (``dns`` and ``host`` commands).

A query passes through these stages:

1. A container sends a UDP query to port 53 of whatever resolver it was
   given. While a suffix is served, a marked nat PREROUTING rule on each
   bridge (``-j REDIRECT``) turns it into a query to this server, on the
   bridge's own address.
2. The server reads it on the control process's event loop; IP_PKTINFO
   says which local address it reached.
3. A name under a served suffix is answered from the table: A and PTR
   records; other types an empty NOERROR answer; unknown names NXDOMAIN.
4. Anything else is relayed to the VM's nameservers (``/etc/resolv.conf``)
   and their answer relayed back unchanged; none answering within the
   timeout gives SERVFAIL.
5. The reply leaves from the address the query reached, so conntrack turns
   it back into an answer from the resolver the container asked.

The table follows the upstream VM side: ``dns SUFFIX`` adds a suffix and
``dns -SUFFIX`` removes it; the ``host`` commands of a control body that has
any ``dns`` or ``host`` command replace every name known before, so the
host pushes its whole table each time and removed names stop resolving.
"""

import asyncio
import ipaddress
import logging
import socket
import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from control import iptables as ipt

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
# Answers may change with every edit of the host's hosts file.
TTL_S = 10
FORWARD_TIMEOUT_S = 2.0
MAX_NAMESERVERS = 3  # as the C library's resolver
MAX_PENDING_FORWARDS = 256
# Datagrams read per wake-up, so a flood cannot starve the control loop.
MAX_BATCH = 64
MAX_DATAGRAM_BYTES = 65535
BRIDGE_CHECK_S = 5.0
# Linux's value; Python's socket module lacks the constant.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo


def _norm(name):
    return name.rstrip(".").lower()


def _under(name, suffix):
    return name == suffix or name.endswith("." + suffix)


def _valid_name(name):
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException:
        return False
    return bool(name) and "," not in name


class NameTable:
    """Served suffixes and the A and PTR records pushed with ``host``."""

    def __init__(self):
        self.suffixes = []  # in the order they were first pushed
        self.addresses = {}  # name -> IPv4Address
        self.pointers = {}  # reverse name ("2.0.18.172.in-addr.arpa") -> name
        self.nodes = set()  # names that exist without records of their own

    def apply(self, commands):
        """Apply the ``dns`` and ``host`` commands of one control body.

        ``commands`` are field lists; others are ignored. Malformed fields
        are skipped and counted. Returns ``(changed, skipped)``.
        """
        skipped = 0
        suffixes = list(self.suffixes)
        hosts = None
        for fields in commands:
            verb, args = fields[0], fields[1:]
            if verb == "dns":
                hosts = [] if hosts is None else hosts
                for arg in args:
                    remove = arg.startswith("-")
                    suffix = _norm(arg[1:] if remove else arg)
                    if not _valid_name(suffix):
                        skipped += 1
                    elif remove and suffix in suffixes:
                        suffixes.remove(suffix)
                    elif not remove and suffix not in suffixes:
                        suffixes.append(suffix)
            elif verb == "host":
                hosts = [] if hosts is None else hosts
                hosts.append(args)
        if hosts is None:
            return False, skipped
        addresses, pointers = {}, {}
        for args in hosts:
            try:
                ip = ipaddress.IPv4Address(args[0])
            except (IndexError, ValueError):
                skipped += 1
                continue
            names = [_norm(n) for n in args[1:] if _valid_name(_norm(n))]
            skipped += len(args) - 1 - len(names)
            if not names:
                continue
            # A later command wins, as on the upstream VM side.
            addresses.update((name, ip) for name in names)
            pointers[_norm(dns.reversename.from_address(str(ip)).to_text())] = names[0]
        changed = (suffixes, addresses, pointers) != (
            self.suffixes,
            self.addresses,
            self.pointers,
        )
        self.suffixes, self.addresses, self.pointers = suffixes, addresses, pointers
        self.nodes = set(suffixes)
        for name in addresses:
            suffix = self.suffix_of(name)
            while suffix is not None and name != suffix:
                name = name.partition(".")[2]
                self.nodes.add(name)
        return changed, skipped

    def suffix_of(self, name):
        """The served suffix ``name`` falls under, or None."""
        for suffix in self.suffixes:
            if _under(name, suffix):
                return suffix
        return None


def answer(table, query):
    """Our response to ``query`` (a dns.message.Message), or None when the
    question is not ours and must be forwarded."""
    if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
        return None
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return None
    name = _norm(question.name.to_text())
    rdtype = question.rdtype
    if rdtype == dns.rdatatype.PTR and name in table.pointers:
        target = table.pointers[name]
        if table.suffix_of(target) is None:
            return None
        response = _response(query)
        response.answer.append(
            dns.rrset.from_text(question.name, TTL_S, "IN", "PTR", target + ".")
        )
        return response
    suffix = table.suffix_of(name)
    if suffix is None:
        return None
    response = _response(query)
    ip = table.addresses.get(name)
    if ip is not None and rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        response.answer.append(
            dns.rrset.from_text(question.name, TTL_S, "IN", "A", str(ip))
        )
        return response
    if ip is None and name not in table.nodes:
        response.set_rcode(dns.rcode.NXDOMAIN)
    # NODATA or NXDOMAIN: the zone's SOA lets resolvers cache the negative
    # answer for TTL_S only.
    soa = f"{suffix}. hostmaster.{suffix}. 1 3600 600 86400 {TTL_S}"
    response.authority.append(
        dns.rrset.from_text(suffix + ".", TTL_S, "IN", "SOA", soa)
    )
    return response


def _response(query):
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    return response


def read_nameservers(path=RESOLV_CONF):
    """The ``nameserver`` addresses of a resolv.conf file, in order."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                out.append(ipaddress.ip_address(fields[1]))
            except ValueError:
                continue
    return out


class DnsServer:
    """The UDP name server; lives on one event loop (uvloop or asyncio).

    Reads with ``add_reader`` and ``recvmsg`` rather than a datagram
    endpoint, because a reply must leave from the address its query
    reached (IP_PKTINFO), which transports cannot say.
    """

    def __init__(
        self,
        table,
        *,
        resolv_conf=RESOLV_CONF,
        upstream_port=DNS_PORT,
        timeout_s=FORWARD_TIMEOUT_S,
    ):
        self.table = table
        self.resolv_conf = resolv_conf
        self.upstream_port = upstream_port
        self.timeout_s = timeout_s
        self.loop = None
        self.sock = None
        self.address = None
        self.pending = set()  # forwarding tasks
        # Interface indexes queries may arrive on (None: any). Replaced
        # whole, never changed in place.
        self.interfaces = None
        self.counters = dict.fromkeys(
            (
                "queries",
                "answered",
                "nxdomain",
                "forwarded",
                "forward_failed",
                "malformed",
                "refused",
                "dropped",
            ),
            0,
        )

    def start(self, host="0.0.0.0", port=0):
        """Bind and start serving; returns the port (``0``: any free one)."""
        self.loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.address = sock.getsockname()
        self.loop.add_reader(sock.fileno(), self._on_readable)
        return self.address[1]

    def close(self):
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for task in self.pending:
            task.cancel()

    def statistics(self):
        return dict(self.counters, pending_forwards=len(self.pending))

    def _on_readable(self):
        for _ in range(MAX_BATCH):
            if self.sock is None:
                return
            try:
                data, ancdata, _, client = self.sock.recvmsg(
                    MAX_DATAGRAM_BYTES, socket.CMSG_SPACE(_PKTINFO.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("dns receive failed errno=%s", exc.errno)
                return
            ifindex, local = None, None
            for level, kind, value in ancdata:
                if (
                    level == socket.IPPROTO_IP
                    and kind == IP_PKTINFO
                    and len(value) >= _PKTINFO.size
                ):
                    ifindex, _, local = _PKTINFO.unpack_from(value)
            if self.interfaces is not None and ifindex not in self.interfaces:
                # Not redirected from a bridge: we are no open resolver.
                self.counters["refused"] += 1
                continue
            self._handle(data, client, local)

    def _handle(self, data, client, local):
        self.counters["queries"] += 1
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            self.counters["malformed"] += 1
            return
        if query.flags & dns.flags.QR:
            self.counters["malformed"] += 1
            return
        response = answer(self.table, query)
        if response is not None:
            key = "nxdomain" if response.rcode() == dns.rcode.NXDOMAIN else "answered"
            self.counters[key] += 1
            self._reply(response.to_wire(), client, local)
            return
        if len(self.pending) >= MAX_PENDING_FORWARDS:
            self.counters["dropped"] += 1
            return
        task = self.loop.create_task(self._forward(data, query, client, local))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    def nameservers(self):
        """Where to forward: the resolv.conf nameservers, never ourselves."""
        out = []
        for ip in read_nameservers(self.resolv_conf):
            ours = (
                self.address is not None
                and self.upstream_port == self.address[1]
                and (str(ip) == self.address[0] or self.address[0] == "0.0.0.0")
            )
            if not ours:
                out.append(ip)
        return out[:MAX_NAMESERVERS]

    async def _forward(self, data, query, client, local):
        self.counters["forwarded"] += 1
        for ip in self.nameservers():
            reply = await self._ask(ip, data)
            if reply is not None:
                self._reply(reply, client, local)
                return
        self.counters["forward_failed"] += 1
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
        self._reply(response.to_wire(), client, local)

    async def _ask(self, ip, data):
        """One nameserver's answer to ``data``, or None."""
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            # A connected socket of its own: the kernel drops datagrams from
            # anyone but this nameserver, and the port is a fresh one.
            sock.connect((str(ip), self.upstream_port))
            await self.loop.sock_sendall(sock, data)
            async with asyncio.timeout(self.timeout_s):
                while True:
                    reply = await self.loop.sock_recv(sock, MAX_DATAGRAM_BYTES)
                    if len(reply) >= 12 and reply[:2] == data[:2]:
                        return reply
        except (OSError, TimeoutError) as exc:
            log.debug("dns forward failed nameserver=%s reason=%s", ip, exc)
            return None
        finally:
            sock.close()

    def _reply(self, data, client, local):
        if self.sock is None:
            return  # closed while a forward was under way
        ancdata = []
        if local is not None:
            ancdata = [
                (socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, local, bytes(4)))
            ]
        try:
            self.sock.sendmsg([data], ancdata, 0, client)
        except OSError:
            # a full socket buffer: the client asks again
            self.counters["dropped"] += 1


def bridges(ipr):
    """``{name: index}`` of the Linux bridges here (docker networks)."""
    out = {}
    for link in ipr.get_links():
        if link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "bridge":
            out[link.get("ifname")] = link["index"]
    return out


class NameService:
    """The ``dns``/``host`` commands put to work in the VM.

    Uses ``side.loop``, ``side.nl`` (its netlink thread runs the iptables
    commands) and ``side.ipt`` (None: no redirect rules). :attr:`redirects`
    is only touched in the netlink thread; the event loop reads
    :attr:`redirected`.
    """

    def __init__(self, side):
        self.side = side
        self.table = NameTable()
        self.server = None
        self.port = None
        self.redirects = {}  # bridge -> rule
        self.redirected = ()  # its bridges, for the event loop to read
        self.warned_no_firewall = False
        self._next_check = 0.0

    def on_commands(self, commands):
        """Apply the ``dns``/``host`` commands of one control body."""
        mine = [f for f in commands if f and f[0] in ("dns", "host")]
        if not mine:
            return
        changed, skipped = self.table.apply(mine)
        if skipped:
            log.warning(
                "dns commands partly ignored reason=malformed fields=%d", skipped
            )
        if changed:
            log.info(
                "names changed suffixes=%s names=%d",
                ",".join(self.table.suffixes) or "-",
                len(self.table.addresses),
            )
        if self.table.suffixes and self.server is None:
            server = DnsServer(self.table)
            try:
                self.port = server.start()
            except OSError as exc:
                log.error("dns server not started reason=%s", exc.strerror)
                return
            server.interfaces = frozenset()  # until the bridges are known
            self.server = server
            log.info("dns server started port=%d", self.port)
        elif not self.table.suffixes and self.server is not None:
            self.close()
            log.info("dns server stopped")
        self.side.loop.create_task(self.redirect())

    async def on_tick(self, now):
        # Docker creates and removes bridges at any time.
        if self.port is not None and now >= self._next_check:
            self._next_check = now + BRIDGE_CHECK_S
            await self.redirect()

    async def redirect(self):
        """Bring the redirect rules and the server's interfaces in line."""
        port, server = self.port, self.server
        indexes = await self.side.nl.run(self.reconcile, port)
        if server is not None and server is self.server:
            server.interfaces = indexes

    def reconcile(self, port):
        """Redirect DNS arriving on every bridge to ``port`` (None: nowhere).

        Netlink thread only. Returns the bridges' interface indexes.
        """
        found = bridges(self.side.nl.ipr) if port is not None else {}
        table = self.side.ipt
        if table is None:
            if port is not None and not self.warned_no_firewall:
                self.warned_no_firewall = True
                log.warning("dns redirect not installed reason=firewall not managed")
            return frozenset(found.values())
        wanted = {}
        if port is not None:
            for bridge in found:
                # LIMIT: every UDP query arriving on a bridge is redirected,
                # including one a container sends to a name server in
                # another container; it is forwarded to the VM's
                # nameservers instead. TCP queries (and IPv6, which
                # ip6tables would need) are not redirected and reach the
                # resolver the container asked.
                wanted[bridge] = [
                    "-i", bridge, "-p", "udp", "--dport", str(DNS_PORT),
                    "-j", "REDIRECT", "--to-ports", str(port),
                ]  # fmt: skip
        try:
            for bridge, rule in list(self.redirects.items()):
                if wanted.get(bridge) != rule:
                    table.delete("nat", "PREROUTING", rule)
                    del self.redirects[bridge]
                    log.info("dns redirect removed bridge=%s", bridge)
            for bridge, rule in wanted.items():
                if bridge not in self.redirects:
                    table.insert("nat", "PREROUTING", rule)
                    self.redirects[bridge] = rule
                    log.info("dns redirected bridge=%s port=%d", bridge, port)
        except ipt.IptablesError as exc:
            log.warning("dns redirect failed reason=%s", exc)
        self.redirected = tuple(sorted(self.redirects))
        return frozenset(found.values())

    def statistics(self):
        stats = self.server.statistics() if self.server is not None else {}
        return dict(
            stats,
            suffixes=list(self.table.suffixes),
            names=len(self.table.addresses),
            bridges=list(self.redirected),
        )

    def close(self):
        """Stop serving (the redirect rules go with the next reconcile, or
        with the purge of marked rules on exit)."""
        if self.server is not None:
            self.server.close()
            self.server = None
            self.port = None
