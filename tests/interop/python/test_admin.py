"""The admin web UI in a real browser: headless Chromium (Debian's) driven by Selenium, against
two sidecars that share a throwaway Redis. The browser logs in on node A and, with the same
cookie, works on node B: the login is stateless across nodes. Sessions deleted and subjects
logged out in the UI are rejected on the other node; a tampered token shows BAD_SIGNATURE; a
lockout is tripped and reset; a logged-out cookie is refused on the other node. Without a
password login answers 403; wrong passwords across both nodes lock both; a form without its
CSRF token is refused; a script tag as a subject renders as text."""

import http.cookiejar
import pathlib
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as shows
from selenium.webdriver.support.ui import WebDriverWait

from conftest import BINARY, start_redis

SECRET = "admin-ui-test-secret-0123456789abcdefghij"
PASSWORD = "correct horse battery staple 42"
COOKIE = "authsidecar_admin"


@pytest.fixture(scope="module")
def redis_url():
    proc, port = start_redis()
    yield f"redis://127.0.0.1:{port}"
    proc.kill()


@pytest.fixture(scope="module")
def password_hash():
    out = subprocess.run([BINARY, "hash-password"], input=PASSWORD + "\n", capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out.startswith("$argon2id$"), out
    return out


class Node:
    def __init__(self, redis_url, prefix, env_extra):
        env = {"AUTH_JWT_SECRET": SECRET, "REDIS_URL": redis_url, "RUST_LOG": "info",
               "PATH": "/usr/bin:/bin"}
        env.update(env_extra)
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0",
             "--admin-listen", "127.0.0.1:0", "--storage", "redis", "--redis-prefix", prefix,
             "--rate-limit", "login=3/1m:lockout=1m", "--admin-login-limit", "3/1m:lockout=1m",
             "--cluster-heartbeat", "300ms"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self.logs = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.logs.append(line)
                match = re.search(r" api=(\S+) ops=(\S+) admin=(\S+)", line)
                if match:
                    self.api, self.ops, self.admin = match.groups()
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(20), "sidecar did not start:\n" + "".join(self.logs)
        self.url = f"http://{self.admin}"
        self.channel = grpc.insecure_channel(self.api)

    def stop(self):
        self.channel.close()
        self.proc.terminate()
        assert self.proc.wait(15) == 0
        text = "".join(self.logs)
        assert PASSWORD not in text, "the admin password in a log line"
        assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", text), "a token or cookie in a log line"


@pytest.fixture(scope="module")
def nodes(redis_url, password_hash):
    pair = [Node(redis_url, "ui:", {"ADMIN_GUI_PASSWORD_HASH": password_hash}) for _ in range(2)]
    yield pair
    for n in pair:
        n.stop()


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def text_of(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def wait_text(driver, element_id, text):
    """Waits for the page that a click loads: element `element_id` holding `text`."""
    WebDriverWait(driver, 10).until(shows.text_to_be_present_in_element((By.ID, element_id), text))


def wait_url(driver, ending):
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith(ending))


def test_an_operator_works_across_nodes_in_a_real_browser(nodes, browser, stubs):
    pb, pb_grpc = stubs
    a, b = nodes
    client_a = pb_grpc.TokenServiceStub(a.channel)
    client_b = pb_grpc.TokenServiceStub(b.channel)

    # Log in on A; see the overview.
    browser.get(a.url + "/")
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "username").send_keys("admin")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    wait_text(browser, "health", "SERVING")
    assert "HS256" in browser.page_source and "login=3/1m" in browser.page_source
    deadline = time.time() + 5
    while "2 live node(s)" not in browser.page_source:
        assert time.time() < deadline, browser.page_source
        time.sleep(0.3)
        browser.refresh()

    # Two sessions of alice, one made on each node, each with a token.
    tokens = {}
    for client in (client_a, client_b):
        session = client.CreateSession(pb.CreateSessionRequest(subject="alice")).session
        token = client.Issue(pb.IssueRequest(subject="alice", session_id=session.id)).token
        tokens[session.id] = token
    first, second = list(tokens)

    # On B, with the cookie A set: the subject's two sessions; delete the first.
    browser.get(b.url + "/subject?s=alice")
    rows = browser.find_elements(By.CSS_SELECTOR, "#sessions tbody tr")
    assert len(rows) == 2, browser.page_source
    row = next(r for r in rows if first in r.text)
    row.find_element(By.TAG_NAME, "button").click()
    wait_text(browser, "notice", "Session deleted")
    assert not client_b.Validate(pb.ValidateRequest(token=tokens[first])).valid
    assert client_a.Validate(pb.ValidateRequest(token=tokens[second])).valid

    # Log alice out everywhere: her other token is rejected on A.
    browser.find_element(By.ID, "logout-everywhere").click()
    wait_text(browser, "notice", "Logged out everywhere")
    assert not client_a.Validate(pb.ValidateRequest(token=tokens[second])).valid

    # A tampered token in the inspector: BAD_SIGNATURE, with its claims shown.
    token = client_a.Issue(pb.IssueRequest(subject="bob")).token
    head, body, signature = token.split(".")
    tampered = ".".join([head, body, ("A" if signature[0] != "A" else "B") + signature[1:]])
    browser.get(a.url + "/token")
    browser.find_element(By.ID, "token").send_keys(tampered)
    browser.find_element(By.ID, "inspect").click()
    wait_text(browser, "verdict", "BAD_SIGNATURE")
    assert text_of(browser, "verdict") == "BAD_SIGNATURE"
    assert '"sub": "bob"' in text_of(browser, "claims")

    # Trip a lockout through the API, see it and reset it in the UI.
    for _ in range(4):
        client_a.CheckRateLimit(pb.CheckRateLimitRequest(policy="login", key="mallory"))
    browser.get(b.url + "/limits?policy=login&key=mallory")
    assert "LOCKED OUT" in text_of(browser, "limit-state")
    browser.find_element(By.ID, "reset").click()
    wait_text(browser, "notice", "Reset on every node")
    assert client_a.CheckRateLimit(
        pb.CheckRateLimitRequest(policy="login", key="mallory")).allowed

    # A script tag as a subject is text.
    script = "<script>document.title='pwned'</script>"
    browser.get(a.url + "/subject?s=" + urllib.parse.quote(script))
    assert text_of(browser, "subject-name") == script
    assert browser.title != "pwned" and "&lt;script&gt;" in browser.page_source

    # Log out on A: the old cookie is refused on B.
    cookie = browser.get_cookie(COOKIE)["value"]
    browser.get(a.url + "/")
    browser.find_element(By.ID, "logout").click()
    wait_url(browser, "/login")
    status, location = raw_get(b.url + "/", cookie)
    assert (status, location) == (303, "/login")
    for node in nodes:
        logs = "".join(node.logs)
        assert cookie not in logs and tampered not in logs and tokens[first] not in logs
        assert "admin UI: logged in" in "".join(a.logs)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def opener():
    jar = http.cookiejar.CookieJar()
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect), jar


def raw_get(url, cookie):
    request = urllib.request.Request(url, headers={"Cookie": f"{COOKIE}={cookie}"})
    try:
        with urllib.request.build_opener(NoRedirect).open(request) as r:
            return r.status, r.headers.get("Location")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location")


def post(open_, url, fields):
    data = urllib.parse.urlencode(fields).encode()
    try:
        with open_.open(urllib.request.Request(url, data=data)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def login_form(open_, node):
    """GETs the login page; returns its CSRF nonce."""
    try:
        with open_.open(node.url + "/login") as r:
            page = r.read().decode()
    except urllib.error.HTTPError as e:
        page = e.read().decode()
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    return match.group(1) if match else ""


def test_without_a_password_login_answers_403(redis_url):
    node = Node(redis_url, "nopass:", {})
    try:
        open_, _ = opener()
        try:
            open_.open(node.url + "/login")
            raise AssertionError("login page served with 200")
        except urllib.error.HTTPError as e:
            assert e.code == 403
            assert "ADMIN_GUI_PASSWORD_HASH" in e.read().decode()
        status, _ = post(open_, node.url + "/login",
                         {"username": "admin", "password": "x", "csrf": "y"})
        assert status == 403
    finally:
        node.stop()


def test_wrong_passwords_across_two_nodes_lock_both(redis_url, password_hash):
    pair = [Node(redis_url, "lock:", {"ADMIN_GUI_PASSWORD_HASH": password_hash})
            for _ in range(2)]
    try:
        statuses = []
        for attempt in range(3):
            open_, _ = opener()
            node = pair[attempt % 2]
            csrf = login_form(open_, node)
            statuses.append(post(open_, node.url + "/login",
                                 {"username": "admin", "password": "wrong", "csrf": csrf})[0])
        assert statuses == [401, 401, 401], statuses
        for node in pair:
            open_, _ = opener()
            csrf = login_form(open_, node)
            status, page = post(open_, node.url + "/login",
                                {"username": "admin", "password": PASSWORD, "csrf": csrf})
            assert status == 429 and "locked out" in page, (status, page)
    finally:
        for node in pair:
            node.stop()


def test_a_form_without_its_csrf_token_is_403(nodes):
    a, _ = nodes
    open_, jar = opener()
    csrf = login_form(open_, a)
    status, _ = post(open_, a.url + "/login",
                     {"username": "admin", "password": PASSWORD, "csrf": csrf})
    assert status == 303
    assert any(c.name == COOKIE for c in jar)
    for fields in ({"subject": "alice"}, {"subject": "alice", "csrf": "forged"}):
        status, page = post(open_, a.url + "/subject/logout", fields)
        assert status == 403 and "CSRF" in page, (status, page)
    # The login form too: a nonce that is not the cookie's.
    open_, _ = opener()
    login_form(open_, a)
    status, _ = post(open_, a.url + "/login",
                     {"username": "admin", "password": PASSWORD, "csrf": "forged"})
    assert status == 403


def test_every_action_is_logged_with_the_user_and_the_client_address(nodes, stubs):
    a, _ = nodes
    pb, pb_grpc = stubs
    stub = pb_grpc.TokenServiceStub(a.channel)
    session = stub.CreateSession(pb.CreateSessionRequest(subject="zed")).session
    token = stub.Issue(pb.IssueRequest(subject="zed")).token
    stub.CheckRateLimit(pb.CheckRateLimitRequest(policy="login", key="zed"))
    open_, _ = opener()
    csrf = login_form(open_, a)
    status, _ = post(open_, a.url + "/login",
                     {"username": "admin", "password": PASSWORD, "csrf": csrf})
    assert status == 303
    with open_.open(a.url + "/") as r:
        csrf = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    actions = [
        ("/subject/delete", {"subject": "zed", "session": session.id}, "a session deleted"),
        ("/subject/logout", {"subject": "zed"}, "a subject logged out everywhere"),
        ("/token/revoke", {"token": token}, "a token revoked"),
        ("/limits/reset", {"policy": "login", "key": "zed"}, "a rate-limit key reset"),
        ("/logout", {}, "admin UI: logged out"),
    ]
    for path, fields, _ in actions:
        status, page = post(open_, a.url + path, dict(fields, csrf=csrf))
        assert status in (200, 303), (path, status, page)
    deadline = time.time() + 5
    for _, _, message in actions:
        while True:
            lines = [l for l in a.logs if message in l]
            if lines or time.time() > deadline:
                break
            time.sleep(0.05)
        assert lines, message
        assert "user=admin" in lines[-1] and "client=127.0.0.1" in lines[-1], lines[-1]


def test_a_body_announced_too_large_is_refused_at_once(nodes):
    a, _ = nodes
    host, port = a.admin.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Content-Length: 10000000000\r\n\r\nabc")
        s.settimeout(1)
        started = time.time()
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert time.time() - started < 1


def test_the_csp_served_is_the_one_the_readme_states(nodes):
    a, _ = nodes
    readme = (pathlib.Path(__file__).parents[3] / "README.md").read_text()
    stated = re.search(r"`Content-Security-Policy:\s*([^`]+)`", readme).group(1)
    try:
        headers = urllib.request.urlopen(a.url + "/login").headers
    except urllib.error.HTTPError as e:
        headers = e.headers
    served = headers["Content-Security-Policy"]
    assert " ".join(served.split()) == " ".join(stated.split()), (served, stated)


def logged_in(node, password=PASSWORD):
    """A fresh login on `node`: its cookie value and the page's CSRF token."""
    open_, jar = opener()
    csrf = login_form(open_, node)
    status, page = post(open_, node.url + "/login",
                        {"username": "admin", "password": password, "csrf": csrf})
    assert status == 303, (status, page)
    cookie = next(c.value for c in jar if c.name == COOKIE)
    with open_.open(node.url + "/") as r:
        csrf = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    return open_, cookie, csrf


def other_hash(password):
    out = subprocess.run([BINARY, "hash-password"], input=password + "\n", capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_a_cookie_is_refused_by_another_deployment_and_after_a_password_change(
        redis_url, password_hash):
    """Two deployments that share the signing secret, with other issuers, do not accept each
    other's cookies; a node whose admin password changed ends every login made before."""
    a = Node(redis_url, "bind-a:", {"ADMIN_GUI_PASSWORD_HASH": password_hash,
                                     "AUTH_ISSUER": "https://a.example.com"})
    b = Node(redis_url, "bind-b:", {"ADMIN_GUI_PASSWORD_HASH": password_hash,
                                     "AUTH_ISSUER": "https://b.example.com"})
    changed = Node(redis_url, "bind-a:", {"ADMIN_GUI_PASSWORD_HASH": other_hash("new pass 77"),
                                          "AUTH_ISSUER": "https://a.example.com"})
    try:
        _, cookie, _ = logged_in(a)
        assert raw_get(a.url + "/", cookie)[0] == 200
        assert raw_get(b.url + "/", cookie) == (303, "/login")
        assert raw_get(changed.url + "/", cookie) == (303, "/login")
    finally:
        for node in (a, b, changed):
            node.stop()


def test_ending_every_admin_session_outlives_max_ttl(redis_url, password_hash):
    """"End every admin session" ends every login on every node, this one included, and its
    record lives as long as the longest login, not --max-ttl (a cookie came back once the
    subject's cutoff expired after --max-ttl)."""
    pair = [Node(redis_url, "endall:", {"ADMIN_GUI_PASSWORD_HASH": password_hash,
                                         "AUTH_MAX_TTL": "2s", "AUTH_ACCESS_TTL": "1s"})
            for _ in range(2)]
    try:
        a, b = pair
        open_a, first, csrf = logged_in(a)
        _, second, _ = logged_in(b)
        status, _ = post(open_a, a.url + "/logout/everyone", {"csrf": csrf})
        assert status == 303
        for _ in range(2):
            for cookie in (first, second):
                for node in pair:
                    assert raw_get(node.url + "/", cookie) == (303, "/login")
            time.sleep(3)
        _, fresh, _ = logged_in(b)
        assert raw_get(a.url + "/", fresh)[0] == 200
        assert any("every admin session ended" in l and "client=127.0.0.1" in l for l in a.logs)
    finally:
        for node in pair:
            node.stop()
