"""The example clients in examples/ (Python grpcio, Node @grpc/grpc-js, Go grpc-go), each run
as its README says, with its language's default channel options, against a real sidecar over
TCP and over a Unix socket. grpcio sends the socket's path as `:authority`, which only the
patched HTTP/2 server (vendor/h2/PATCHED.md) accepts; over TCP such an authority is refused."""

import os
import pathlib
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ROOT, SECRET, run_sidecar

EXAMPLES = ROOT / "examples"
GO_ENV = {
    # Offline, against Debian's golang-google-grpc-dev and golang-google-protobuf-dev.
    "GO111MODULE": "off",
    "GOPATH": "/usr/share/gocode",
    "GOFLAGS": "",
}


@pytest.fixture(scope="module", params=["tcp", "unix"])
def target(request, tmp_path_factory):
    """The API target of a sidecar listening on TCP or on a Unix socket, as clients name it."""
    if request.param == "tcp":
        listen = "127.0.0.1:0"
    else:
        listen = f"unix:{tmp_path_factory.mktemp('sock') / 'api.sock'}"
    for api, _ in run_sidecar(["--rate-limit", "api=100/1s"], {"AUTH_JWT_SECRET": SECRET},
                              listen=listen):
        yield api if request.param == "tcp" else listen


@pytest.fixture(scope="module")
def go_client(tmp_path_factory):
    binary = tmp_path_factory.mktemp("go") / "client"
    env = {**os.environ, **GO_ENV, "GOCACHE": str(tmp_path_factory.mktemp("gocache"))}
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=EXAMPLES / "go", env=env,
                   check=True)
    return binary


def run(argv, **kwargs):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.lower()
    assert out.startswith("ok: issued, validated, rate limit allowed=true"), done.stdout
    assert "rejected as invalid_reason_revoked" in out, done.stdout


def test_python_client(stubs, target):
    stub_dir = pathlib.Path(stubs[0].__file__).parents[2]
    run([sys.executable, str(EXAMPLES / "python/client.py"), target],
        env={**os.environ, "PYTHONPATH": str(stub_dir)})


def test_node_client(target):
    run(["node", str(EXAMPLES / "node/client.mjs"), target])


def test_go_client(go_client, target):
    run([str(go_client), target])


def test_go_stubs_match_the_proto(tmp_path):
    """generate.sh, run on a copy, changes nothing: the committed stubs are the proto's."""
    import grpc_tools

    # generate.sh reads ../../proto: the copy sits where the tree around it has one.
    copy = tmp_path / "examples" / "go"
    shutil.copytree(EXAMPLES / "go", copy)
    (tmp_path / "proto").symlink_to(ROOT / "proto")
    wrapper = tmp_path / "protoc"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m grpc_tools.protoc "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PROTOC": str(wrapper),
           "PROTOC_INCLUDE": str(pathlib.Path(grpc_tools.__file__).parent / "_proto")}
    subprocess.run([str(copy / "generate.sh")], env=env, check=True)
    for name in ["token_service.pb.go", "token_service_grpc.pb.go"]:
        assert (copy / name).read_text() == (EXAMPLES / "go" / name).read_text(), name


def test_a_malformed_authority_is_refused_over_tcp(stubs):
    """What grpcio sends on a Unix socket, sent over TCP: refused on both listeners, as an
    unpatched HTTP/2 server would, while a normal authority works."""
    pb, rpc = stubs
    for api, ops in run_sidecar([], {"AUTH_JWT_SECRET": SECRET}):
        for authority in ["%2Frun%2Fapi.sock", "/run/api.sock"]:
            options = [("grpc.default_authority", authority)]
            with grpc.insecure_channel(api, options=options) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    rpc.TokenServiceStub(channel).Issue(pb.IssueRequest(subject="x"), timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert ":authority" in err.value.details()
            with grpc.insecure_channel(ops, options=options) as channel:
                with pytest.raises(grpc.RpcError):
                    health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5)
        with grpc.insecure_channel(ops) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_go_example_is_gofmt_clean():
    unformatted = subprocess.run(["gofmt", "-l", str(EXAMPLES / "go")], capture_output=True,
                                 text=True, check=True).stdout
    assert unformatted == "", unformatted
