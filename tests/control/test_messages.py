import os

import pytest

from control import messages


def test_pack_and_unpack_round_trip_with_bytes():
    msg = messages.unpack(
        messages.pack(messages.FRAME, src=["127.0.0.1", 5], data=b"\x00\xff")
    )
    assert msg == {"op": "frame", "src": ["127.0.0.1", 5], "data": b"\x00\xff"}


def test_unpack_rejects_garbage_and_maps_without_op():
    with pytest.raises(ValueError):
        messages.unpack(b"\xc1\xc1")
    with pytest.raises(ValueError):
        messages.unpack(messages.pack("x")[:-3] + b"")  # truncated
    import msgpack

    with pytest.raises(ValueError):
        messages.unpack(msgpack.packb({"no": "op"}))


def test_schema_module_imports_nothing_from_the_project():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(messages.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        assert not any(n.split(".")[0] in ("fastfwd", "control", "lab") for n in names)


def test_data_plane_imports_only_the_schema_from_control():
    import ast
    import pathlib

    for path in (
        pathlib.Path(messages.__file__).parents[1].joinpath("fastfwd").glob("*.py")
    ):
        if path.name == "__main__.py":
            continue  # `python -m fastfwd` is the CLI, which lives in control/
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "control"
            ):
                assert node.module == "control" and [a.name for a in node.names] == [
                    "messages"
                ], path
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith("control"), path


def test_a_stopping_instance_removes_only_its_own_control_socket(tmp_path):
    import socket

    from control import localsock

    path = str(tmp_path / "c.sock")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.bind(path)
    first.listen()
    assert localsock.in_use(path)
    mine = localsock.inode(path)
    first.close()
    assert not localsock.in_use(path)  # a file left by a dead instance
    os.unlink(path)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.bind(path)  # another instance's socket at the same path
    try:
        localsock.remove_own(path, mine)
        assert os.path.exists(path)
        localsock.remove_own(path, localsock.inode(path))
        assert not os.path.exists(path)
    finally:
        second.close()
