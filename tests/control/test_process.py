"""The control process's view of GSO frames: stop asking for them once the
writers report frames that arrived cut up."""

import os
import socket

from control.process import Side, _udp_gro_on
from fastfwd import endpoints
from fastfwd import stats as st


def side_with_counters(workers=2):
    fd = st.create(workers)
    side = object.__new__(Side)
    side.spec = {"workers": workers}
    side.counters = st.Counters(fd)
    side.gso_frames_ok = True
    side._splits_seen = 0
    return side, fd


def test_split_frames_withdraw_gso_frames_once():
    side, fd = side_with_counters()
    try:
        assert side.check_splits() is False
        side.counters.slot(st.slot_index("writer", 1))[st.DROPS_SPLIT] = 3
        assert side.check_splits() is True
        assert side.gso_frames_ok is False
        side.counters.slot(st.slot_index("writer", 0))[st.DROPS_SPLIT] = 1
        assert side.check_splits() is False  # said once; stays off
    finally:
        os.close(fd)


def test_gso_frames_are_offered_only_with_udp_gro():
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tuned = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        endpoints.tune_socket(tuned)
        assert _udp_gro_on([tuned]) is True
        assert _udp_gro_on([tuned, plain]) is False
    finally:
        plain.close()
        tuned.close()
