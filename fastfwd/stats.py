"""Counters in shared memory, one slot of 64-bit integers per process.

The supervisor creates the memory (a memfd) and every child maps it. Each
slot has exactly one writing process, so no locking is needed: 8-byte
aligned stores are atomic on the platforms fastfwd runs on, and a reader
(the control process, answering ``status``) sees each value whole.
"""

import mmap
import os

# Every slot uses the same indices; a counter a role never touches stays 0.
FIELDS = (
    "pkts_in",  # packets received (reader: from TUN; writer: from UDP)
    "bytes_in",
    "pkts_out",  # packets sent on (reader: to UDP; writer: to TUN)
    "bytes_out",
    "drops_no_peer",  # reader: no peer address known yet
    "drops_io",  # a send or write failed with an OS error
    "drops_malformed",  # writer: datagram of unknown type or truncated
    "drops_unknown_src",  # writer: IP packet from an address that is not the peer
    "drops_control_full",  # writer: control channel full, frame dropped
    "frames_to_control",  # writer: non-IP frames handed to the control process
    "backpressure",  # reader: times the UDP socket was full and reading paused
    "last_in_ns",  # writer: CLOCK_MONOTONIC of the last packet from the peer
    "last_out_ns",  # reader: CLOCK_MONOTONIC of the last datagram sent
    "control_bodies",  # VM writer: whole control bodies reassembled
    "control_aborted",  # VM writer: control bodies given up (lost chunk)
    "batches",
    "drops_throttled",  # writer: frames from strangers over the rate limit
    "to_accessors",  # host writer: packets relayed from the VM side to accessors
    "from_accessors",  # host writer 0: accessor packets relayed to the VM side
    "drops_acl",  # host writer 0: accessor packets to an address not exposed,
    # from an address not its own, or needing a segmentation not supported
    "pongs",  # host writer 0: echo requests to the host answered (pong on)
    "drops_split",  # writer: an offload frame that did not arrive whole
)
INDEX = {name: i for i, name in enumerate(FIELDS)}
SLOT_FIELDS = 24
SLOT_BYTES = SLOT_FIELDS * 8
assert len(FIELDS) <= SLOT_FIELDS

PKTS_IN, BYTES_IN, PKTS_OUT, BYTES_OUT = 0, 1, 2, 3
DROPS_NO_PEER, DROPS_IO, DROPS_MALFORMED, DROPS_UNKNOWN_SRC = 4, 5, 6, 7
DROPS_CONTROL_FULL, FRAMES_TO_CONTROL, BACKPRESSURE = 8, 9, 10
LAST_IN_NS, LAST_OUT_NS, CONTROL_BODIES, CONTROL_ABORTED, BATCHES = 11, 12, 13, 14, 15
DROPS_THROTTLED = 16
TO_ACCESSORS, FROM_ACCESSORS, DROPS_ACL, PONGS, DROPS_SPLIT = 17, 18, 19, 20, 21


def slot_index(role, queue):
    """Slot of a worker process: readers and writers interleave per queue."""
    return 2 * queue + (0 if role == "reader" else 1)


def create(workers):
    """Create the shared counter memory; returns its file descriptor."""
    fd = os.memfd_create("fastfwd-stats", os.MFD_CLOEXEC)
    os.ftruncate(fd, max(1, 2 * workers) * SLOT_BYTES)
    return fd


class Counters:
    """A view of the counter memory; ``slot(i)`` gives one process's array."""

    def __init__(self, fd):
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(
            fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._all = memoryview(self._map).cast("Q")

    @property
    def slots(self):
        return len(self._all) // SLOT_FIELDS

    def slot(self, index):
        """The writable array of one slot; index with the constants above."""
        start = index * SLOT_FIELDS
        return self._all[start : start + SLOT_FIELDS]

    def read(self, index):
        """A dict snapshot of one slot."""
        values = self.slot(index).tolist()
        return {name: values[i] for i, name in enumerate(FIELDS)}

    def close(self):
        self._all.release()
        self._map.close()
