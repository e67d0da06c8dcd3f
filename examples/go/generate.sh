#!/usr/bin/env bash
# Regenerates the Go stubs beside main.go from proto/ (package main, so the example is one
# directory). Needs protoc (here grpcio-tools' copy), protoc-gen-go and protoc-gen-go-grpc.
# tests/interop/python/test_examples.py checks that the committed stubs match.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
protoc=${PROTOC:-protoc}
proto=authsidecar/v1/token_service.proto
$protoc -I ../../proto ${PROTOC_INCLUDE:+-I "$PROTOC_INCLUDE"} \
  --go_out="$out" --go_opt="M$proto=./;main" \
  --go-grpc_out="$out" --go-grpc_opt="M$proto=./;main" \
  "$proto"
cp "$out"/token_service.pb.go "$out"/token_service_grpc.pb.go .
