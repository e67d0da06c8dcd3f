// A Node app's use of auth-sidecar: issue a token, validate it, check a rate limit, revoke the
// token and see it rejected. Plain @grpc/grpc-js with its default channel options, the proto
// loaded at run time by @grpc/proto-loader; the target is the sidecar's --listen, over TCP or
// a Unix socket:
//
//   node examples/node/client.mjs 127.0.0.1:50051
//   node examples/node/client.mjs unix:/run/auth-sidecar/api.sock
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const proto = fileURLToPath(new URL("../../proto/authsidecar/v1/token_service.proto", import.meta.url));
const definition = protoLoader.loadSync(proto, { keepCase: false, enums: String, defaults: true });
const { TokenService } = grpc.loadPackageDefinition(definition).authsidecar.v1;

const target = process.argv[2] ?? "127.0.0.1:50051";
const policy = process.env.RATE_LIMIT_POLICY ?? "api";
// The sidecar is in the same pod, on loopback or a socket: no TLS.
const client = new TokenService(target, grpc.credentials.createInsecure());
const call = (method, request) => {
  const deadline = new Date(Date.now() + 10_000);
  return promisify(client[method].bind(client))(request, { deadline });
};

const issued = await call("issue", { subject: "node-user" });
const valid = await call("validate", { token: issued.token });
assert.ok(valid.valid && valid.subject === "node-user", JSON.stringify(valid));
const limit = await call("checkRateLimit", { policy, key: "node-user" });
await call("revoke", { token: issued.token });
const after = await call("validate", { token: issued.token });
assert.ok(!after.valid && after.reason === "INVALID_REASON_REVOKED", JSON.stringify(after));
// Bad input is a status naming the field, not a crash.
await assert.rejects(call("issue", {}), (e) => e.code === grpc.status.INVALID_ARGUMENT);
console.log(
  `ok: issued, validated, rate limit allowed=${limit.allowed} remaining=${limit.remaining}, ` +
    `revoked, rejected as ${after.reason}`,
);
client.close();
