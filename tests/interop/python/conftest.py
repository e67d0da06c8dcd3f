"""Fixtures for the Python interop tests: Python stubs generated from proto/ by grpcio-tools,
and a real auth-sidecar process on free loopback ports."""

import os
import pathlib
import re
import subprocess
import sys
import socket
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
SECRET = "python-interop-secret-0123456789abcdefgh"
BINARY = os.environ.get("AUTH_SIDECAR_BIN", str(ROOT / "target/debug/auth-sidecar"))


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """Generates the authsidecar.v1 modules with grpc_tools.protoc and makes them importable."""
    out = tmp_path_factory.mktemp("stubs")
    from grpc_tools import protoc
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main([
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "proto/authsidecar/v1/token_service.proto"),
        str(ROOT / "proto/authsidecar/v1/mfa_service.proto"),
    ])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    from authsidecar.v1 import token_service_pb2, token_service_pb2_grpc

    return token_service_pb2, token_service_pb2_grpc


@pytest.fixture(scope="session")
def mfa_stubs(stubs):
    """The authsidecar.v1 MfaService modules."""
    from authsidecar.v1 import mfa_service_pb2, mfa_service_pb2_grpc

    return mfa_service_pb2, mfa_service_pb2_grpc


def run_sidecar(args, env_extra, listen="127.0.0.1:0", ops="127.0.0.1:0", logs=None):
    """Starts `auth-sidecar serve` on `listen` and `ops` with `args` and yields its API and
    ops addresses; stops it afterwards and checks that it drained and exited 0. `env_extra`
    may set RUST_LOG (`info` otherwise); every log line is appended to `logs` when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    env.update({"RUST_LOG": "info", **env_extra})
    proc = subprocess.Popen(
        [BINARY, "serve", "--listen", listen, "--ops-listen", ops, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = threading.Event()
    found = {}

    def read_logs():
        for line in proc.stderr:
            if logs is not None:
                logs.append(line)
            match = re.search(r" serving api=(\S+) ops=(\S+)", line)
            if match:
                found["api"], found["ops"] = match.groups()
                ready.set()

    reader = threading.Thread(target=read_logs, daemon=True)
    reader.start()
    try:
        assert ready.wait(20), "sidecar did not start"
        yield found["api"], found["ops"]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, "sidecar did not drain and exit 0 on SIGTERM"
        reader.join(5)


@pytest.fixture()
def sidecar_addrs():
    """A sidecar with an HS256 secret and a rate-limit policy `py` of 2 an hour; yields its API
    and ops addresses."""
    yield from run_sidecar(["--rate-limit", "py=2/1h"], {"AUTH_JWT_SECRET": SECRET})


@pytest.fixture()
def sidecar(sidecar_addrs):
    """The same sidecar; yields its API address."""
    return sidecar_addrs[0]


def run_keyed_sidecar(alg, keys_dir):
    """A sidecar whose active key, made by `auth-sidecar keys generate`, is of algorithm `alg`;
    yields (algorithm, API address, ops address)."""
    entry = subprocess.run(
        [BINARY, "keys", "generate", "--alg", alg, "--kid", f"py-{alg}", "--dir", str(keys_dir)],
        check=True, capture_output=True, text=True,
    ).stdout
    (keys_dir / "keys.toml").write_text(entry.replace('"verify"', '"active"'))
    for api, ops in run_sidecar(["--keys-dir", str(keys_dir)], {}):
        yield alg, api, ops


@pytest.fixture(params=["ES256", "EdDSA"])
def keyed_sidecar(request, tmp_path):
    """A sidecar signing with an ES256 or an EdDSA key."""
    yield from run_keyed_sidecar(request.param, tmp_path)


@pytest.fixture()
def es256_sidecar(tmp_path):
    """A sidecar signing with an ES256 key: the algorithm every JOSE library here verifies."""
    yield from run_keyed_sidecar("ES256", tmp_path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis():
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")
