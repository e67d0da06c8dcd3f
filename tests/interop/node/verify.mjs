// Verifies a sidecar token offline against its JWKS with two Node libraries, as an app would:
// `jose` (with maxTokenAge, which checks that `iat` is in the past) and `jsonwebtoken` (with
// maxAge). Usage: node verify.mjs JWKS_FILE TOKEN. Prints the subject each saw; exits non-zero
// when either refuses the token.
import { readFileSync } from 'node:fs';
import { createPublicKey } from 'node:crypto';
import * as jose from 'jose';
import jsonwebtoken from 'jsonwebtoken';

const [jwksFile, token] = process.argv.slice(2);
const jwks = JSON.parse(readFileSync(jwksFile, 'utf8'));

const { payload } = await jose.jwtVerify(token, jose.createLocalJWKSet(jwks), {
  issuer: 'auth-sidecar',
  maxTokenAge: '1h',
});

const header = jose.decodeProtectedHeader(token);
const jwk = jwks.keys.find((k) => k.kid === header.kid);
const pem = createPublicKey({ key: jwk, format: 'jwk' }).export({ type: 'spki', format: 'pem' });
const claims = jsonwebtoken.verify(token, pem, {
  algorithms: [header.alg],
  issuer: 'auth-sidecar',
  maxAge: '1h',
});

console.log(JSON.stringify({ jose: payload.sub, jsonwebtoken: claims.sub }));
