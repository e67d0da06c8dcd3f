"""AWS KMS for the tests: moto's server (`moto[server]`), an emulator, since there is no AWS
here; and a counting proxy in front of it that sees every call the sidecar makes.

Run as a script, this module starts moto's server with two corrections where moto 5.2 differs
from AWS KMS's documented behaviour, each of which would make every signature it affects
fail to verify (and the sidecar refuse to mint with it):
- moto signs RSASSA_PSS_SHA_256 with the largest salt the key allows; AWS KMS uses a 256-bit
  salt, the digest's length, which JOSE's PS256 requires too (RFC 7518 section 3.5);
- moto ignores `MessageType=DIGEST` and hashes the digest again; AWS KMS signs the digest as
  given. (The sidecar sends a digest only for a signing input over 4096 bytes.)
Everything else is moto as released."""

import base64
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def patched_moto_main(argv):
    """moto's server, its PSS salt the digest's length and its DIGEST messages signed as
    digests, as AWS KMS's."""
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from moto.kms import responses, utils

    class KmsPss(padding.PSS):
        MAX_LENGTH = padding.PSS.DIGEST_LENGTH

    class Padding:
        def __getattr__(self, name):
            return KmsPss if name == "PSS" else getattr(padding, name)

    utils.padding = Padding()

    # moto's server answers each request on its own thread.
    mode = threading.local()
    response_sign = responses.KmsResponse.sign

    def sign_response(self):
        mode.digest = self._get_param("MessageType") == "DIGEST"
        try:
            return response_sign(self)
        finally:
            mode.digest = False

    def prehashed(algorithm):
        return Prehashed(algorithm) if getattr(mode, "digest", False) else algorithm

    def ecdsa_sign(self, message, signing_algorithm):
        utils.validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
        algorithm = self._ECDSAPrivateKey__hash_algorithm(signing_algorithm)
        return self.private_key.sign(message, ec.ECDSA(prehashed(algorithm)))

    def rsa_sign(self, message, signing_algorithm):
        utils.validate_signing_algorithm(
            signing_algorithm, utils.SigningAlgorithm.rsa_signing_algorithms())
        pad, algorithm = self._RSAPrivateKey__padding_and_hash_algorithm(signing_algorithm)
        return self.private_key.sign(message, pad, prehashed(algorithm))

    responses.KmsResponse.sign = sign_response
    utils.ECDSAPrivateKey.sign = ecdsa_sign
    utils.RSAPrivateKey.sign = rsa_sign
    from moto.server import main

    main(argv)


class KmsProxy:
    """An HTTP proxy in front of the emulator that counts KMS calls by operation, the most
    `Sign` calls it ever held at once and the messages they signed, and can delay or
    throttle `Sign` calls as a busy KMS does (HTTP 400, `ThrottlingException`, as AWS KMS
    answers over its quota), or send them to another key than the one asked for, as a KMS
    that signs with the wrong key would."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.calls = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.sign_delay = 0.0
        self.throttle_next = 0
        self.throttled = 0
        self.sign_with = None
        self.messages = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
                signing = operation == "Sign"
                with proxy.lock:
                    proxy.calls[operation] = proxy.calls.get(operation, 0) + 1
                    if signing:
                        proxy.messages.append(base64.b64decode(json.loads(body)["Message"]))
                        proxy.in_flight += 1
                        proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                        throttle = proxy.throttle_next > 0
                        if throttle:
                            proxy.throttle_next -= 1
                            proxy.throttled += 1
                try:
                    if signing and throttle:
                        self.answer(400, {"x-amzn-ErrorType": "ThrottlingException",
                                          "Content-Type": "application/x-amz-json-1.1"},
                                    json.dumps({"__type": "ThrottlingException",
                                                "message": "Rate exceeded"}).encode())
                        return
                    if signing and proxy.sign_delay:
                        time.sleep(proxy.sign_delay)
                    if signing and proxy.sign_with:
                        request = json.loads(body)
                        request["KeyId"] = proxy.sign_with
                        body = json.dumps(request).encode()
                        self.headers.replace_header("Content-Length", str(len(body)))
                    upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port,
                                                          timeout=60)
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("connection", "keep-alive")}
                    upstream.request("POST", self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    upstream.close()
                    kept = {k: v for k, v in response.getheaders()
                            if k.lower() not in ("connection", "transfer-encoding",
                                                 "content-length", "server", "date")}
                    self.answer(response.status, kept, data)
                finally:
                    if signing:
                        with proxy.lock:
                            proxy.in_flight -= 1

            def answer(self, status, headers, body):
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    # The sidecar gave up on the call (its timeout): nothing to answer.
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def count(self, operation):
        with self.lock:
            return self.calls.get(operation, 0)

    def reset(self):
        with self.lock:
            self.calls.clear()
            self.messages.clear()
            self.max_in_flight = self.in_flight
            self.sign_delay = 0.0
            self.throttle_next = 0
            self.throttled = 0
            self.sign_with = None

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Emulator:
    """moto's KMS on a free port, stopped and continued as a process (SIGSTOP, SIGCONT), with
    a boto3 client to make keys and a proxy in front for the sidecar."""

    REGION = "eu-west-1"

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise AssertionError("moto_server did not start")
                time.sleep(0.1)
        import boto3

        self.client = boto3.client(
            "kms", region_name=self.REGION, endpoint_url=f"http://127.0.0.1:{self.port}",
            aws_access_key_id="emulator", aws_secret_access_key="emulator",
        )
        self.proxy = KmsProxy(self.port)

    def create_key(self, spec, usage="SIGN_VERIFY"):
        """A new key's id; `spec` as KMS names it (ECC_NIST_P256, RSA_2048, ...)."""
        return self.client.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["KeyId"]

    def stop(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self):
        self.resume()
        self.proxy.close()
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    patched_moto_main(sys.argv[1:])
