"""Addresses and routes on the TUN device, through netlink (pyroute2).

Routes belong to the user: every route fastfwd installs carries the routing
protocol number :data:`RTPROT_FASTFWD`, so it can tell its own routes from
anyone else's. It never deletes or replaces a route without that mark, and
refuses a subnet that overlaps the host's own networks unless the ``route``
line says ``force``.
"""

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from fastfwd.errors import DeviceError, RouteConflict

log = logging.getLogger(__name__)

# Shown by `ip route` as "proto 251"; 251 echoes the default port and subnet.
RTPROT_FASTFWD = 251
MAIN_TABLE = 254
GSO_MAX_BYTES = 65000


class Netlink:
    """One rtnetlink socket, living in a thread of its own.

    pyroute2's synchronous IPRoute drives a private asyncio loop and refuses
    to start inside a running one, and its asynchronous variant needs
    datagram endpoints that uvloop lacks. So the socket is created and used
    in one dedicated thread: the event loop hands it work with :meth:`run`,
    and every method below runs only there. That thread also runs the
    blocking iptables commands, which keeps them off the event loop.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self.ipr = self._pool.submit(IPRoute).result()

    async def run(self, fn, *args):
        """Run ``fn(*args)`` in the netlink thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self):
        self._pool.submit(self.ipr.close).result()
        self._pool.shutdown()

    def ifindex(self, ifname):
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise DeviceError(f"interface {ifname} does not exist")
        return found[0]

    def configure_tun(self, ifname, address, prefixlen, mtu):
        """Give the TUN its address and MTU and bring it up (idempotent)."""
        index = self.ifindex(ifname)
        try:
            self.ipr.link("set", index=index, mtu=mtu)
            try:
                # A super-packet plus fastfwd's 11 bytes of framing must fit
                # one UDP datagram (65507 bytes over IPv4).
                self.ipr.link("set", index=index, gso_max_size=GSO_MAX_BYTES)
            except NetlinkError as exc:
                log.debug("gso_max_size not set dev=%s reason=%s", ifname, _reason(exc))
            try:
                self.ipr.addr(
                    "add", index=index, address=str(address), prefixlen=prefixlen
                )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            self.ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise DeviceError(
                f"cannot configure {ifname} address={address}/{prefixlen} mtu={mtu}: "
                f"{_reason(exc)}"
            ) from exc
        return index

    def flush_addresses(self, ifname):
        """Remove every IPv4 address from the device."""
        index = self.ifindex(ifname)
        for msg in self.ipr.get_addr(family=socket.AF_INET, index=index):
            self.ipr.addr(
                "del", index=index, address=msg.get("address"),
                prefixlen=msg["prefixlen"],
            )  # fmt: skip

    def replace_tun_address(self, ifname, address, prefixlen, mtu):
        """Make ``address/prefixlen`` the device's only IPv4 address (an
        accessor's session may move it), with the MTU; brings it up."""
        index = self.ifindex(ifname)
        for msg in self.ipr.get_addr(family=socket.AF_INET, index=index):
            if (msg.get("address"), msg["prefixlen"]) != (str(address), prefixlen):
                self.ipr.addr(
                    "del", index=index, address=msg.get("address"),
                    prefixlen=msg["prefixlen"],
                )  # fmt: skip
        return self.configure_tun(ifname, address, prefixlen, mtu)

    def ipv4_addresses(self):
        """``(ifname, IPv4Interface)`` of every address in this namespace."""
        names = {link["index"]: link.get("ifname") for link in self.ipr.get_links()}
        out = []
        for msg in self.ipr.get_addr(family=socket.AF_INET):
            iface = ipaddress.IPv4Interface(f"{msg.get('address')}/{msg['prefixlen']}")
            out.append((names.get(msg["index"]), iface))
        return out

    def main_routes(self):
        """IPv4 routes of the main table as ``(network, proto, oif, gateway)``."""
        out = []
        for msg in self.ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            dst = msg.get("dst") or "0.0.0.0"
            net = ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}")
            out.append((net, msg["proto"], msg.get("oif"), msg.get("gateway")))
        return out


# How often routes something else removed are looked for and restored.
ROUTE_CHECK_S = 2.0


class RouteTable:
    """The routes fastfwd keeps on one device: add, remove, restore.

    ``desired`` is the set of networks that should be routed into the
    device; :meth:`reconcile` makes the kernel agree, touching only routes
    that carry fastfwd's mark.
    """

    def __init__(self, netlink, ifname):
        self.nl = netlink
        self.ifname = ifname
        self.index = netlink.ifindex(ifname)
        self.refused = {}  # network -> reason, reported once per change

    def owned(self):
        return {
            net
            for net, proto, oif, _ in self.nl.main_routes()
            if proto == RTPROT_FASTFWD and oif == self.index
        }

    def conflict(self, net, any_proto_here=False):
        """Why ``net`` must not be routed into the tunnel, or None.

        ``any_proto_here``: routes on the device itself never conflict, not
        only fastfwd's (for the device's own address and its kernel route).
        """
        for name, iface in self.nl.ipv4_addresses():
            if name == self.ifname:
                continue
            if iface.network.overlaps(net):
                return f"overlaps {iface.network} on {name}"
        for other, proto, oif, gateway in self.nl.main_routes():
            if oif == self.index and (any_proto_here or proto == RTPROT_FASTFWD):
                continue
            if other.prefixlen == 0:
                if gateway and ipaddress.IPv4Address(gateway) in net:
                    return f"contains the default gateway {gateway}"
                continue
            if other.overlaps(net):
                return f"overlaps the existing route {other}"
        return None

    def reconcile(self, routes):
        """Make the kernel hold exactly ``routes`` (Route objects) on the device.

        Returns ``(added, removed)``; refused routes are in :attr:`refused`.
        """
        desired = {r.network: r for r in routes}
        owned = self.owned()
        added, removed = [], []
        for net in sorted(owned - desired.keys()):
            self._delete(net)
            removed.append(net)
        refused = {}
        for net, route in desired.items():
            if net in owned:
                continue
            reason = None if route.force else self.conflict(net)
            if reason is None:
                reason = self._add(net)
            if reason is None:
                added.append(net)
            else:
                refused[net] = reason
        for net, reason in refused.items():
            if self.refused.get(net) != reason:
                log.error(
                    "route refused dst=%s dev=%s reason=%s", net, self.ifname, reason
                )
        self.refused = refused
        return added, removed

    def _add(self, net):
        try:
            self.nl.ipr.route("add", dst=str(net), oif=self.index, proto=RTPROT_FASTFWD)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return "a route to it exists already and is not fastfwd's"
            return _reason(exc)
        return None

    def _delete(self, net):
        try:
            self.nl.ipr.route("del", dst=str(net), oif=self.index, proto=RTPROT_FASTFWD)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENODEV):
                raise RouteConflict(
                    f"cannot remove route {net}: {_reason(exc)}"
                ) from exc

    def remove_all(self):
        """Delete every route fastfwd made on the device."""
        for net in self.owned():
            self._delete(net)


def routable(text):
    """Whether a network someone else names (a VM side's bridges, a host's
    exposed networks) may be routed into a tunnel: unicast, not loopback,
    link-local, multicast or reserved, at least /8."""
    net = ipaddress.IPv4Network(text)
    addr = net.network_address
    return net.prefixlen >= 8 and not (
        addr.is_multicast or addr.is_loopback or addr.is_link_local
        or addr.is_reserved or addr.is_unspecified or net.broadcast_address.is_multicast
    )  # fmt: skip


async def remove_owned_routes(ifname):
    """Clean-up after a control process that died: remove fastfwd's routes
    on ``ifname``, if the device is still there."""
    nl = Netlink()
    try:
        table = await nl.run(RouteTable, nl, ifname)
        await nl.run(table.remove_all)
    except Exception as exc:  # the device may be gone already
        log.debug("cleanup skipped routes reason=%s", exc)
    finally:
        nl.close()


def _reason(exc):
    code = getattr(exc, "code", None)
    return os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
