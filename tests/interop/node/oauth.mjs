// openid-client (npm) as an OAuth 2.0 resource server uses the sidecar: discovery from the ops
// listener's /.well-known/openid-configuration, then tokenIntrospection and tokenRevocation
// with client_secret_basic at the endpoints the document lists. Prints one JSON line of what
// it saw, for tests/interop/python/test_oauth.py to check.
//
// node oauth.mjs ISSUER_URL CLIENT_ID SECRET ACCESS_TOKEN
import * as client from 'openid-client';

const [issuer, clientId, secret, token] = process.argv.slice(2);

async function configure(clientSecret) {
  return client.discovery(new URL(issuer), clientId, undefined, client.ClientSecretBasic(clientSecret), {
    execute: [client.allowInsecureRequests],
  });
}

const config = await configure(secret);
const metadata = config.serverMetadata();
const before = await client.tokenIntrospection(config, token);
await client.tokenRevocation(config, token, { token_type_hint: 'access_token' });
const after = await client.tokenIntrospection(config, token);
let wrongSecret;
try {
  await client.tokenIntrospection(await configure(`${secret}-wrong`), token);
  wrongSecret = 'accepted';
} catch (e) {
  // A 401 with a WWW-Authenticate challenge: openid-client reports the challenge's scheme.
  wrongSecret = { status: e.status, name: e.name, scheme: e.cause?.[0]?.scheme };
}
console.log(JSON.stringify({
  introspection_endpoint: metadata.introspection_endpoint,
  revocation_endpoint: metadata.revocation_endpoint,
  before,
  after,
  wrongSecret,
}));
