import pytest

from lab import Lab
from lab.tunnel import Tunnel


@pytest.fixture
def lab():
    with Lab(bridges=2, containers_per_bridge=1) as lab:
        yield lab


@pytest.fixture
def tunnel(lab, tmp_path):
    t = Tunnel(lab, tmp_path / "tunnel")
    try:
        t.start()
        yield t
    except BaseException:
        print(t.logs())
        raise
    finally:
        t.stop()
