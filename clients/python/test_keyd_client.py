"""Tests of keyd_client against a real keyd.

Run from the repository root:

    python3 -m unittest discover -s clients/python -v

setUpClass builds keyd with `go build` (or uses $KEYD_BIN), starts it on a
temporary keys.json and .env of made-up secrets, on a short socket path,
and stops it with SIGINT at the end. Standard library only; Python 3.9+.
"""

import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
import urllib.error
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent  # clients/python -> repo root
sys.path.insert(0, str(HERE))

import keyd_client  # noqa: E402
from keyd_client import (  # noqa: E402
    Forbidden, KeyLease, KeyManager, KeydError, NoCapacity, NotRunning, UnknownModel,
)

SECRETS = {
    "ok_01": "AIzaFAKE-pytest-ok-01-not-a-real-key-000001",
    "cool_01": "AIzaFAKE-pytest-cool-01-not-a-real-key-00002",
    "slow_01": "AIzaFAKE-pytest-slow-01-not-a-real-key-00003",
    "ctx_01": "AIzaFAKE-pytest-ctx-01-not-a-real-key-000004",
    "usage_01": "AIzaFAKE-pytest-usage-01-not-a-real-key-0005",
}

# One model per test that cares about bucket state, so that tests do not
# disturb each other whatever their order.
KEYS_JSON = {
    "lease_ttl": "10m",
    "default_tokens": 1000,
    "keys": [
        {"key_id": "ok_01", "project": "p-ok", "model_name": "gemini-2.5-pro",
         "rpm": 100000, "tpm": 1000000000, "workload_type": "heavy"},
        {"key_id": "cool_01", "project": "p-cool", "model_name": "gemini-2.5-flash",
         "rpm": 1000, "tpm": 10000000},
        {"key_id": "slow_01", "project": "p-slow", "model_name": "gemini-2.0-flash",
         "rpm": 1, "tpm": 1000000},
        {"key_id": "ctx_01", "project": "p-ctx", "model_name": "gemini-2.5-flash-lite",
         "rpm": 100000, "tpm": 1000000000},
        {"key_id": "usage_01", "project": "p-usage", "model_name": "gemini-2.0-flash-lite",
         "rpm": 1000, "tpm": 10000000},
    ],
}

# A tiny Go program printing what api/socket.go resolves, to compare with.
SOCKPATH_GO = """package main

import (
	"fmt"
	"os"
	"strconv"

	"github.com/keyd/keyd/api"
)

func main() {
	uid, _ := strconv.Atoi(os.Args[1])
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	fmt.Println(api.SocketPathFrom(os.Getenv, uid))
	fmt.Println(api.ClientSocketPathFrom(os.Getenv, uid, exists))
}
"""


def find_go():
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.path.exists(go):
        raise RuntimeError("go not found: put Go 1.26 on PATH, or set KEYD_BIN to a built keyd")
    return go


def go_build(out, target):
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-buildvcs=false")
    r = subprocess.run([find_go(), "build", "-o", str(out), target], cwd=str(REPO),
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=600)
    if r.returncode != 0:
        raise RuntimeError("go build %s failed:\n%s" % (target, r.stdout.decode(errors="replace")))


# --- a stand-in for google-genai's errors module (google/genai/errors.py) ---

class APIError(Exception):
    """Shaped as google.genai.errors.APIError: code, status, message, and
    details = the whole parsed JSON body."""

    def __init__(self, code, response_json, response=None):
        self.response = response
        self.details = response_json
        self.message = response_json.get("message", response_json.get("error", {}).get("message"))
        self.status = response_json.get("status", response_json.get("error", {}).get("status"))
        self.code = code if code else response_json.get("error", {}).get("code")
        super().__init__("%s %s. %s" % (self.code, self.status, self.details))


class ClientError(APIError):
    pass


class ServerError(APIError):
    pass


def usage_metadata(prompt, output, total):
    return types.SimpleNamespace(prompt_token_count=prompt, candidates_token_count=output,
                                 total_token_count=total, thoughts_token_count=None)


def load_testdata(name):
    with open(REPO / "internal" / "gemini" / "testdata" / name) as f:
        return json.load(f)


class UnitTests(unittest.TestCase):
    """What needs no keyd."""

    def test_socket_path_table(self):
        # The cases of api/socket_test.go, and more.
        sysp = keyd_client.SYSTEM_SOCKET_PATH
        cases = [
            ({"KEYD_SOCKET": "/x.sock", "RUNTIME_DIRECTORY": "/r"}, 1000, True, "/x.sock", "/x.sock"),
            ({"RUNTIME_DIRECTORY": "/run/keyd:/run/other"}, 0, False, sysp, sysp),
            ({}, 0, False, sysp, sysp),
            ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, False,
             "/run/user/1000/keyd/keyd.sock", "/run/user/1000/keyd/keyd.sock"),
            ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, True, "/run/user/1000/keyd/keyd.sock", sysp),
            ({}, 1000, False, "/tmp/keyd-1000/keyd.sock", "/tmp/keyd-1000/keyd.sock"),
            ({}, 1000, True, "/tmp/keyd-1000/keyd.sock", sysp),
            ({"TMPDIR": "/var//tmp/"}, 1000, False, "/var/tmp/keyd-1000/keyd.sock", "/var/tmp/keyd-1000/keyd.sock"),
            ({"RUNTIME_DIRECTORY": "/r/"}, 1000, True, "/r/keyd.sock", "/r/keyd.sock"),
            ({"KEYD_SOCKET": "", "XDG_RUNTIME_DIR": "/x/"}, 1000, False, "/x/keyd/keyd.sock", "/x/keyd/keyd.sock"),
        ]
        for env, uid, system, daemon, client in cases:
            with self.subTest(env=env, uid=uid, system=system):
                self.assertEqual(keyd_client.socket_path_from(env.get, uid), daemon)
                got = keyd_client.client_socket_path_from(
                    env.get, uid, lambda p: system and p == sysp)
                self.assertEqual(got, client)

    def test_secret_hint(self):
        lease = KeyLease(lease_id="l1", key_id="k", model="m", secret="AIzaSECRETVALUE1234")
        for text in (repr(lease), str(lease), "%s" % lease, "{}".format(lease), repr([lease])):
            self.assertNotIn("AIzaSECRETVALUE1234", text)
            self.assertIn("\u20261234", text)
        self.assertEqual(lease.secret, "AIzaSECRETVALUE1234")
        self.assertEqual(lease["secret"], "AIzaSECRETVALUE1234")
        self.assertNotIn("abcd", repr(KeyLease(secret="abcd")))  # at most half shows
        self.assertNotIn("AIzaSECRETVALUE1234", repr(lease.copy()))
        self.assertIsInstance(lease.copy(), KeyLease)
        with self.assertRaises(AttributeError):
            lease.nope  # noqa: B018

    def test_usage_forms(self):
        n = keyd_client._normalize_usage
        want = {"prompt_tokens": 1100, "output_tokens": 300, "total_tokens": 1400}
        self.assertEqual(n({"prompt_tokens": 1100, "output_tokens": 300, "total_tokens": 1400}), want)
        self.assertEqual(n({"prompt_token_count": 1100, "candidates_token_count": 300,
                            "total_token_count": 1400}), want)
        self.assertEqual(n({"promptTokenCount": 1100, "candidatesTokenCount": 300,
                            "totalTokenCount": 1400}), want)
        self.assertEqual(n(usage_metadata(1100, 300, 1400)), want)
        self.assertEqual(n(types.SimpleNamespace(usage_metadata=usage_metadata(1100, 300, 1400))), want)
        # Thinking tokens are output tokens too.
        um = types.SimpleNamespace(prompt_token_count=10, candidates_token_count=5,
                                   thoughts_token_count=7, total_token_count=22)
        self.assertEqual(n(um), {"prompt_tokens": 10, "output_tokens": 12, "total_tokens": 22})
        self.assertEqual(n({"prompt_tokens": 5}), {"prompt_tokens": 5})
        self.assertIsNone(n(None))
        self.assertIsNone(n(types.SimpleNamespace(usage_metadata=None)))
        with self.assertRaises(ValueError):
            n({"prompt": 1})

    def test_outcomes(self):
        o = keyd_client._outcome
        body = load_testdata("429_classic_tpm.json")
        self.assertEqual(o(None), {"status": 200})
        self.assertEqual(o(ClientError(429, body)), {"status": 429, "error": body})
        self.assertEqual(o(ServerError(503, {"error": {"code": 503, "message": "overloaded",
                                                        "status": "UNAVAILABLE"}}))["status"], 503)
        # google-genai's non-JSON fallback body.
        got = o(ClientError(404, {"message": "<html>not found</html>", "status": "Not Found"}))
        self.assertEqual(got, {"status": 404, "error": {"message": "<html>not found</html>",
                                                        "status": "Not Found"}})
        for exc in (ConnectionResetError(), TimeoutError(), socket.timeout(), OSError("x"),
                    ConnectionRefusedError()):
            self.assertEqual(o(exc), {"status": 0}, exc)
        # httpx-like transport error, recognised by module and class name.
        httpx_mod = types.ModuleType("httpx")
        exec("class TransportError(Exception): pass\n"
             "class ConnectError(TransportError): pass", httpx_mod.__dict__)
        httpx_mod.TransportError.__module__ = httpx_mod.ConnectError.__module__ = "httpx"
        self.assertEqual(o(httpx_mod.ConnectError("boom")), {"status": 0})
        # An HTTP error carrying a response (httpx.HTTPStatusError, requests.HTTPError).
        resp = types.SimpleNamespace(status_code=429, json=lambda: body, text=json.dumps(body))
        exc = Exception("429")
        exc.response = resp
        self.assertEqual(o(exc), {"status": 429, "error": body})
        # urllib's HTTPError.
        import io
        herr = urllib.error.HTTPError("http://x", 429, "Too Many", {}, io.BytesIO(json.dumps(body).encode()))
        got = o(herr)
        self.assertEqual(got["status"], 429)
        self.assertEqual(json.loads(got["error"]), body)
        # Anything else: unused, unless sent.
        self.assertEqual(o(ValueError("bad prompt")), {"unused": True})
        self.assertEqual(o(ValueError("bad parse"), sent=True), {"status": 0})
        self.assertEqual(o(KeyboardInterrupt()), {"unused": True})
        # An exception with an unrelated int code is not an API error.
        self.assertEqual(o(SystemExit(2)), {"unused": True})

    def test_keyd_error_answers(self):
        e = keyd_client._api_error(
            429, "Too Many Requests", {"Retry-After": "3"},
            b'{"error":{"code":"no_capacity","message":"all busy","retry_after_ms":2500}}')
        self.assertIsInstance(e, NoCapacity)
        self.assertEqual((e.code, e.status, e.message, e.retry_after), ("no_capacity", 429, "all busy", 2.5))
        e = keyd_client._api_error(429, "Too Many Requests", {"Retry-After": "3"},
                                   b'{"error":{"code":"no_capacity","message":"x"}}')
        self.assertEqual(e.retry_after, 3.0)
        e = keyd_client._api_error(429, "Too Many Requests", {}, b'{"error":{"code":"no_capacity","message":"x"}}')
        self.assertIsNone(e.retry_after)
        e = keyd_client._api_error(502, "Bad Gateway", {}, b"<html>oops</html>")
        self.assertEqual(type(e), KeydError)
        self.assertEqual(e.code, "internal")
        self.assertIn("502 Bad Gateway: <html>oops</html>", e.message)
        self.assertIsInstance(keyd_client._api_error(403, "Forbidden", {}, b""), Forbidden)
        self.assertIsInstance(keyd_client._api_error(
            404, "Not Found", {}, b'{"error":{"code":"unknown_model","message":"m"}}'), UnknownModel)

    def test_report_arguments(self):
        km = KeyManager(socket_path="/nonexistent/keyd.sock")
        with self.assertRaises(ValueError):
            km.report("l1")
        with self.assertRaises(ValueError):
            km.report("l1", status=200, unused=True)
        with self.assertRaises(ValueError):
            km.report("", status=200)
        with self.assertRaises(KeydError) as cm:
            km.select_key(tokens_needed=5000)
        self.assertEqual(cm.exception.code, "bad_request")

    def _fake_keyd(self, sock, status=200):
        """Serve POST /v1/leases/{id}/report on the Unix socket sock,
        answering status; returns (server, list of (path, body))."""
        import http.server
        import socketserver
        got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                got.append((self.path, json.loads(body)))
                if status == 200:
                    out = {"lease_id": "L1", "key_id": "k1", "classification": "rate_minute"}
                    if len(got) > 1:
                        out["duplicate"] = True
                else:
                    out = {"error": {"code": "bad_request", "message": "no"}}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        srv = Server(sock, Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.addCleanup(srv.server_close)
        self.addCleanup(srv.shutdown)
        return srv, got

    def _short_socket(self):
        d = tempfile.mkdtemp(prefix="kdr", dir="/tmp")
        self.addCleanup(shutil.rmtree, d, True)
        return os.path.join(d, "s")

    def test_report_retried_while_keyd_restarts(self):
        sock = self._short_socket()
        started = {}

        def later():
            time.sleep(0.3)
            started["srv"] = self._fake_keyd(sock)

        t = threading.Thread(target=later)
        t.start()
        self.addCleanup(t.join)
        km = KeyManager(socket_path=sock)
        t0 = time.monotonic()
        out = km.report("L1", status=429)
        elapsed = time.monotonic() - t0
        t.join()
        km.close()
        self.assertEqual(out["classification"], "rate_minute")
        self.assertEqual(started["srv"][1], [("/v1/leases/L1/report", {"status": 429})])
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 5)

    def test_report_retry_bounded_and_selective(self):
        sock = self._short_socket()
        km = KeyManager(socket_path=sock, report_retry=0.25)
        t0 = time.monotonic()
        with self.assertRaises(NotRunning):
            km.report("L1", status=200)
        self.assertLess(time.monotonic() - t0, 2)
        # Disabled: one try.
        t0 = time.monotonic()
        with self.assertRaises(NotRunning):
            KeyManager(socket_path=sock, report_retry=0).report("L1", status=200)
        self.assertLess(time.monotonic() - t0, 0.1)
        # An answer from keyd (4xx) is not retried.
        _, got = self._fake_keyd(sock, status=400)
        km = KeyManager(socket_path=sock)
        with self.assertRaises(KeydError) as cm:
            km.report("L1", status=200)
        km.close()
        self.assertEqual(cm.exception.status, 400)
        self.assertEqual(len(got), 1)
        # A reset connection is retried; a timeout is not.
        e = KeydError("x", code="transport_error")
        e.__cause__ = ConnectionResetError()
        self.assertTrue(keyd_client._unreachable(e))
        e.__cause__ = keyd_client.http.client.RemoteDisconnected()
        self.assertTrue(keyd_client._unreachable(e))
        e = KeydError("x", code="timeout")
        e.__cause__ = socket.timeout()
        self.assertFalse(keyd_client._unreachable(e))

    def test_python39_syntax(self):
        import ast
        for name in ("keyd_client.py", "test_keyd_client.py"):
            ast.parse((HERE / name).read_text(), feature_version=(3, 9))


class KeydTests(unittest.TestCase):
    """Against a real keyd."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="kp", dir="/tmp"))
        cls.proc = None
        try:
            cls._start()
        except BaseException:
            cls._stop()
            raise

    @classmethod
    def _start(cls):
        tmp = cls.tmp
        keyd = os.environ.get("KEYD_BIN")
        if not keyd:
            keyd = str(tmp / "keyd")
            go_build(keyd, "./cmd/keyd")
        src = tmp / "sockpath.go"
        src.write_text(SOCKPATH_GO)
        cls.sockpath_bin = str(tmp / "sockpath")
        go_build(cls.sockpath_bin, str(src))

        (tmp / "keys.json").write_text(json.dumps(KEYS_JSON, indent=1))
        env_file = tmp / "keyd.env"
        env_file.write_text("".join("GEMINI_KEY_%s=%s\n" % kv for kv in SECRETS.items()))
        env_file.chmod(0o600)
        cls.sock = str(tmp / "s.sock")
        cls.log_path = tmp / "keyd.log"
        args = [keyd, "--config", str(tmp / "keys.json"), "--env-file", str(env_file),
                "--socket", cls.sock, "--state-dir", str(tmp / "state"), "--log-level", "debug"]
        cls.as_root = os.geteuid() == 0 and _nobody() is not None
        if cls.as_root:
            # Let the uid nobody reach the socket, to test keyd's 403.
            args += ["--socket-group", str(_nobody().pw_gid)]
            tmp.chmod(0o711)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GEMINI_KEY_", "KEYD_", "CREDENTIALS_DIRECTORY",
                                    "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET",
                                    "WATCHDOG_"))}
        cls.log_file = open(cls.log_path, "wb")
        cls.proc = subprocess.Popen(args, stdout=cls.log_file, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(tmp))
        cls.km = KeyManager(socket_path=cls.sock, client_name="test_keyd_client")
        deadline = time.monotonic() + 30
        while True:
            if cls.proc.poll() is not None:
                raise RuntimeError("keyd exited with %s:\n%s" % (cls.proc.returncode, cls._log()))
            try:
                cls.km.health()
                break
            except NotRunning:
                if time.monotonic() > deadline:
                    raise RuntimeError("keyd did not answer on %s:\n%s" % (cls.sock, cls._log()))
                time.sleep(0.02)

    @classmethod
    def _log(cls, tail=4000):
        try:
            text = cls.log_path.read_text(errors="replace")
            return text[-tail:] if tail else text
        except OSError:
            return ""

    @classmethod
    def _stop(cls):
        """Stop keyd (SIGINT, then wait); return its full log. The
        temporary directory is removed whatever happens."""
        try:
            if getattr(cls, "km", None):
                cls.km.close()
            if cls.proc and cls.proc.poll() is None:
                cls.proc.send_signal(signal.SIGINT)
                try:
                    cls.proc.wait(15)
                except subprocess.TimeoutExpired:
                    cls.proc.kill()
                    cls.proc.wait()
            if getattr(cls, "log_file", None):
                cls.log_file.close()
            return cls._log(tail=None)
        finally:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def tearDownClass(cls):
        log = cls._stop()
        if cls.proc and cls.proc.returncode != 0:
            raise RuntimeError("keyd exited with %s after SIGINT:\n%s"
                               % (cls.proc.returncode, log[-4000:]))
        leaked = [k for k, v in SECRETS.items() if v in log]
        if leaked:
            raise RuntimeError("keyd's log shows the secrets of %s" % leaked)
        if "keyd stopped" not in log:
            raise RuntimeError("keyd did not log a clean stop:\n%s" % log[-4000:])

    def bucket(self, project, model):
        for b in self.km.status()["buckets"]:
            if b["project"] == project and b["model"] == model:
                return b
        self.fail("no bucket %s/%s in status" % (project, model))

    # -- tests -----------------------------------------------------------------

    def test_health_and_status(self):
        h = self.km.health()
        self.assertTrue(h["ok"])
        self.assertEqual(h["keys_total"], len(SECRETS))
        st = self.km.status()
        self.assertEqual(sorted(k["key_id"] for k in st["keys"]), sorted(SECRETS))
        text = json.dumps(st)
        for s in SECRETS.values():
            self.assertNotIn(s, text)

    def test_socket_path_matches_go(self):
        d = self.tmp / "run-user"
        (d / "keyd").mkdir(parents=True, exist_ok=True)
        cases = [
            ({}, 1000),
            ({}, 0),
            ({"TMPDIR": "/var//tmp/"}, 1234),
            ({"TMPDIR": "rel/../x"}, 1234),
            ({"XDG_RUNTIME_DIR": "/run/user/1000/"}, 1000),
            ({"XDG_RUNTIME_DIR": str(d)}, 1000),
            ({"XDG_RUNTIME_DIR": "//a/./b/.."}, 1000),
            ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 0),
            ({"RUNTIME_DIRECTORY": "/run/keyd:/run/other"}, 1000),
            ({"RUNTIME_DIRECTORY": ":/run/other"}, 1000),
            ({"RUNTIME_DIRECTORY": "relative/dir/"}, 1000),
            ({"KEYD_SOCKET": "rel.sock", "RUNTIME_DIRECTORY": "/r"}, 0),
            ({"KEYD_SOCKET": "", "XDG_RUNTIME_DIR": "/x"}, 1000),
        ]
        for env, uid in cases:
            with self.subTest(env=env, uid=uid):
                full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
                out = subprocess.run([self.sockpath_bin, str(uid)], env=full, check=True,
                                     stdout=subprocess.PIPE).stdout.decode().splitlines()
                got = [keyd_client.socket_path_from(full.get, uid),
                       keyd_client.client_socket_path_from(full.get, uid, keyd_client._exists)]
                self.assertEqual(got, out)

    def test_select_key_and_report(self):
        lease = self.km.select_key(model_preference="gemini-2.5-pro", tokens_needed=1200)
        self.assertIsInstance(lease, dict)
        self.assertEqual(lease["key_id"], "ok_01")
        self.assertEqual(lease["secret"], SECRETS["ok_01"])
        self.assertEqual(lease["model"], "gemini-2.5-pro")
        self.assertEqual(lease["project"], "p-ok")
        self.assertEqual(lease["tokens"], 1200)
        self.assertTrue(lease["lease_id"])
        self.assertTrue(lease["expires_at"].endswith("Z"))
        self.assertEqual(lease.secret, lease["secret"])
        self.assertNotIn(SECRETS["ok_01"], repr(lease))
        self.assertNotIn(SECRETS["ok_01"], str(lease))
        r = self.km.report(lease["lease_id"], status=200,
                           usage={"prompt_tokens": 1100, "output_tokens": 300, "total_tokens": 1400})
        self.assertEqual(r["classification"], "success")
        self.assertEqual(r["lease_id"], lease["lease_id"])
        self.assertFalse(r.get("duplicate", False))
        r = self.km.report(lease, status=200)  # the lease itself works as the id
        self.assertTrue(r["duplicate"])
        # workload_type filter
        lease = self.km.select_key("gemini-2.5-pro", workload_type="heavy")
        self.assertEqual(self.km.report(lease, unused=True)["classification"], "unused")
        with self.assertRaises(KeydError) as cm:
            self.km.select_key("gemini-2.5-pro", workload_type="light")
        self.assertEqual(cm.exception.code, "no_keys")
        # keyd's own validation comes back as a KeydError with its message.
        with self.assertRaises(KeydError) as cm:
            self.km.select_key("gemini-2.5-pro", tokens_needed=-1)
        self.assertEqual((cm.exception.code, cm.exception.status), ("bad_request", 400))
        self.assertIn('"tokens" must be >= 0', str(cm.exception))
        with self.assertRaises(KeydError) as cm:
            self.km.report("l-no-such-lease", status=200)
        self.assertEqual((cm.exception.code, cm.exception.status), ("not_found", 404))

    def test_context_manager_success_with_usage(self):
        with self.km.lease("gemini-2.0-flash-lite", tokens_needed=1200) as lease:
            self.assertEqual(lease.key_id, "usage_01")
            self.assertEqual(lease.secret, SECRETS["usage_01"])
            self.assertEqual(lease["model"], "gemini-2.0-flash-lite")
            self.assertNotIn(SECRETS["usage_01"], repr(lease))
            resp = types.SimpleNamespace(text="ok", usage_metadata=usage_metadata(1100, 300, 1400))
            lease.usage = resp.usage_metadata
        self.assertTrue(lease.reported)
        self.assertIsNone(lease.report_error)
        self.assertEqual(lease.result["classification"], "success")
        rows = self.km.usage(key_id="usage_01")["rows"]
        self.assertEqual(sum(r["requests"] for r in rows), 1)
        self.assertEqual(sum(r["prompt_tokens"] for r in rows), 1100)
        self.assertEqual(sum(r["output_tokens"] for r in rows), 300)
        self.assertEqual(self.bucket("p-usage", "gemini-2.0-flash-lite")["in_flight"], 0)

    def test_context_manager_genai_429(self):
        body = load_testdata("429_classic_tpm.json")
        with self.assertRaises(ClientError) as cm:
            with self.km.lease("gemini-2.5-flash", tokens_needed=1200) as lease:
                self.assertEqual(lease.key_id, "cool_01")
                raise ClientError(429, body)
        self.assertEqual(cm.exception.code, 429)  # the original exception, re-raised
        self.assertEqual(lease.result["classification"], "rate_minute")
        self.assertIn("cooling", lease.result["action"])
        b = self.bucket("p-cool", "gemini-2.5-flash")
        self.assertEqual(b["state"], "cooling")
        self.assertTrue(b.get("until"))
        # The cooling bucket now refuses leases, saying when to retry.
        with self.assertRaises(NoCapacity) as cm:
            self.km.select_key("gemini-2.5-flash")
        e = cm.exception
        self.assertEqual((e.code, e.status), ("no_capacity", 429))
        self.assertIsInstance(e.retry_after, float)
        self.assertGreater(e.retry_after, 0)
        self.assertLessEqual(e.retry_after, 300)

    def test_context_manager_server_error_and_network_error(self):
        with self.assertRaises(ServerError):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                raise ServerError(503, load_testdata("503_overloaded.json"))
        self.assertEqual(lease.result["classification"], "server_error")
        with self.assertRaises(ConnectionResetError):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                raise ConnectionResetError("peer reset")
        self.assertEqual(lease.result["classification"], "network_error")
        with self.assertRaises(socket.timeout):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                raise socket.timeout("read timed out")
        self.assertEqual(lease.result["classification"], "network_error")

    def test_context_manager_other_exceptions(self):
        # Raised before the call: unused, the reservation is refunded.
        with self.assertRaises(ValueError):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                raise ValueError("prompt template broken")
        self.assertEqual(lease.result["classification"], "unused")
        # Marked sent: the outcome is unknown, status 0.
        with self.assertRaises(ValueError):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                lease.sent = True
                raise ValueError("response parsing failed")
        self.assertEqual(lease.result["classification"], "network_error")
        # Usage set: the call succeeded, whatever comes after.
        with self.assertRaises(OSError):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                lease.usage = usage_metadata(10, 5, 15)
                raise OSError("disk full while saving the answer")
        self.assertEqual(lease.result["classification"], "success")
        # A usage keyd cannot read: success without usage, and a warning.
        with self.assertLogs("keyd_client", logging.WARNING):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                lease.usage = {"tokens": 12}
        self.assertEqual(lease.result["classification"], "success")
        # No usage, no exception: success without usage.
        with self.km.lease("gemini-2.5-flash-lite") as lease:
            pass
        self.assertEqual(lease.result["classification"], "success")

    def test_context_manager_explicit_reports(self):
        with self.km.lease("gemini-2.5-flash-lite") as lease:
            r = lease.unused()
        self.assertEqual(r["classification"], "unused")
        self.assertIs(lease.result, r)
        with self.assertRaises(ValueError):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                lease.report(status=500, error={"error": {"code": 500, "message": "boom"}})
                raise ValueError("after an explicit report nothing more is sent")
        self.assertEqual(lease.result["classification"], "server_error")
        self.assertFalse(lease.result.get("duplicate", False))

    def test_call_helper(self):
        def generate_content(model, contents):
            self.assertEqual(model, "gemini-2.5-flash-lite")
            return types.SimpleNamespace(text="hi", usage_metadata=usage_metadata(7, 3, 10))

        with self.km.lease("gemini-2.5-flash-lite") as lease:
            resp = lease.call(generate_content, model=lease.model, contents="hello")
        self.assertEqual(resp.text, "hi")
        self.assertEqual(lease.result["classification"], "success")

        def bad_request(**kw):
            raise ClientError(400, load_testdata("400_bad_request.json"))

        with self.assertRaises(ClientError):
            with self.km.lease("gemini-2.5-flash-lite") as lease:
                lease.call(bad_request, model=lease.model)
        self.assertEqual(lease.result["classification"], "client_error")

    def test_async_context_manager(self):
        import asyncio

        async def main():
            async with self.km.lease("gemini-2.5-flash-lite", tokens_needed=50) as lease:
                await asyncio.sleep(0)
                lease.usage = usage_metadata(40, 2, 42)
            ok = lease.result["classification"]
            try:
                async with self.km.lease("gemini-2.5-flash-lite") as lease:
                    raise ServerError(503, load_testdata("503_unavailable.json"))
            except ServerError:
                pass
            return ok, lease.result["classification"]

        self.assertEqual(asyncio.run(main()), ("success", "server_error"))

    def test_report_and_reraise(self):
        lease = self.km.select_key("gemini-2.5-flash-lite")
        with self.assertRaises(ServerError):
            try:
                raise ServerError(500, load_testdata("500_internal.json"))
            except ServerError:
                self.km.report_and_reraise(lease)
        r = self.km.report(lease, status=200)
        self.assertTrue(r["duplicate"])
        self.assertEqual(r["classification"], "server_error")
        # report(error=exception) derives the status.
        lease = self.km.select_key("gemini-2.5-flash-lite")
        r = self.km.report(lease, error=ConnectionResetError())
        self.assertEqual(r["classification"], "network_error")

    def test_no_capacity_retry_after(self):
        lease = self.km.select_key("gemini-2.0-flash")  # rpm 1
        self.assertEqual(self.km.report(lease, status=200)["classification"], "success")
        with self.assertRaises(NoCapacity) as cm:
            self.km.select_key("gemini-2.0-flash")
        e = cm.exception
        self.assertIsInstance(e, KeydError)
        self.assertEqual((e.code, e.status), ("no_capacity", 429))
        self.assertIsInstance(e.retry_after, float)
        self.assertGreater(e.retry_after, 30)
        self.assertLessEqual(e.retry_after, 61)  # 60 s window + the 1 s window_margin
        t0 = time.monotonic()
        with self.assertRaises(NoCapacity):
            self.km.select_key("gemini-2.0-flash", wait=0.3)
        self.assertLess(time.monotonic() - t0, 5)
        # The context manager raises it on entry; nothing is reported.
        with self.assertRaises(NoCapacity):
            with self.km.lease("gemini-2.0-flash"):
                self.fail("the block must not run")

    def test_unknown_model(self):
        with self.assertRaises(UnknownModel) as cm:
            self.km.select_key(model_preference="gemini-2.5-flsh", tokens_needed=100)
        e = cm.exception
        self.assertEqual((e.code, e.status), ("unknown_model", 404))
        self.assertIn("did you mean gemini-2.5-flash", e.message)
        self.assertIn("did you mean", str(e))

    def test_not_running(self):
        missing = str(self.tmp / "missing.sock")
        with self.assertRaises(NotRunning) as cm:
            KeyManager(socket_path=missing).select_key("gemini-2.5-pro")
        self.assertEqual(str(cm.exception),
                         "keyd is not running (socket %s): start it with "
                         "`keyd --config keys.json` or `systemctl start keyd`" % missing)
        self.assertEqual(cm.exception.code, "not_running")
        self.assertEqual(cm.exception.socket_path, missing)
        self.assertIsNone(cm.exception.status)
        # A socket file nobody listens on (left by a crash) is the same.
        stale = str(self.tmp / "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(stale)
        s.close()
        with self.assertRaises(NotRunning):
            KeyManager(socket_path=stale).health()
        # So is a path through a missing directory, via the environment.
        old = os.environ.get("KEYD_SOCKET")
        os.environ["KEYD_SOCKET"] = missing
        try:
            self.assertEqual(KeyManager().socket_path, missing)
        finally:
            if old is None:
                del os.environ["KEYD_SOCKET"]
            else:
                os.environ["KEYD_SOCKET"] = old

    def test_keep_alive_and_reconnect(self):
        connects = []
        orig = keyd_client.UnixHTTPConnection.connect

        def counting(conn):
            connects.append(1)
            orig(conn)

        km = KeyManager(socket_path=self.sock)
        keyd_client.UnixHTTPConnection.connect = counting
        try:
            for _ in range(5):
                km.health()
            self.assertEqual(len(connects), 1)
            # The kept-alive connection breaks (keyd restarted, idle timeout):
            # the next call reconnects once, transparently.
            self.assertEqual(len(km._idle), 1)
            km._idle[0].sock.shutdown(socket.SHUT_RDWR)
            lease = km.select_key("gemini-2.5-pro")
            self.assertEqual(len(connects), 2)
            km.report(lease, unused=True)
            self.assertEqual(len(connects), 2)
        finally:
            keyd_client.UnixHTTPConnection.connect = orig
            km.close()

    def test_threads_share_a_manager(self):
        km = KeyManager(socket_path=self.sock)
        ids, errors = [], []

        def work():
            try:
                for _ in range(5):
                    with km.lease("gemini-2.5-pro", tokens_needed=10) as lease:
                        ids.append(lease.lease_id)
                        lease.usage = {"prompt_tokens": 9}
                    if lease.result["classification"] != "success":
                        errors.append(lease.result)
            except Exception as e:  # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        km.close()
        self.assertEqual(errors, [])
        self.assertEqual(len(ids), 40)
        self.assertEqual(len(set(ids)), 40)

    def test_failed_report_is_logged_not_raised(self):
        km = KeyManager(socket_path=self.sock, report_retry=0.2)
        with self.assertLogs("keyd_client", logging.WARNING) as logs:
            with self.assertRaises(ClientError):
                with km.lease("gemini-2.5-flash-lite") as lease:
                    km.close()
                    km.socket_path = str(self.tmp / "gone.sock")  # keyd "went away"
                    raise ClientError(429, load_testdata("429_no_details_capacity.json"))
        self.assertIsInstance(lease.report_error, NotRunning)
        self.assertIsNone(lease.result)
        out = "\n".join(logs.output)
        self.assertIn(lease.lease_id, out)
        self.assertIn("keyd is not running", out)
        self.assertNotIn(lease.secret, out)
        # Clean up: the lease is still open in keyd.
        self.assertEqual(self.km.report(lease.lease_id, unused=True)["classification"], "unused")

    @unittest.skipUnless(os.geteuid() == 0, "needs root to run a client as another uid")
    def test_forbidden(self):
        if not self.as_root:
            self.skipTest("no user nobody")
        nobody = _nobody()
        python = _python_for(nobody)
        if python is None:
            self.skipTest("no python3 that the user nobody may run")
        pub = self.tmp / "pub"
        pub.mkdir(exist_ok=True)
        pub.chmod(0o755)
        shutil.copy(HERE / "keyd_client.py", pub / "keyd_client.py")
        (pub / "keyd_client.py").chmod(0o644)
        priv = self.tmp / "priv"
        priv.mkdir(exist_ok=True)
        priv.chmod(0o700)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(priv / "k.sock"))
        s.listen(1)
        code = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import keyd_client as k
out = {}
km = k.KeyManager(socket_path=sys.argv[2])
out["health"] = km.health()["ok"]
try:
    km.select_key("gemini-2.5-pro")
except k.Forbidden as e:
    out["lease"] = [e.code, e.status, e.message]
try:
    k.KeyManager(socket_path=sys.argv[3]).health()
except k.Forbidden as e:
    out["socket"] = [e.code, e.status, e.message]
print(json.dumps(out))
"""
        try:
            r = subprocess.run(
                [python, "-I", "-c", code, str(pub), self.sock, str(priv / "k.sock")],
                user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/",
                env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                timeout=30)
        finally:
            s.close()
        self.assertEqual(r.returncode, 0, r.stderr.decode(errors="replace"))
        out = json.loads(r.stdout)
        self.assertTrue(out["health"])  # reading is open to any peer
        code_, status, message = out["lease"]
        self.assertEqual((code_, status), ("forbidden", 403))
        self.assertIn("access.lease", message)
        code_, status, message = out["socket"]
        self.assertEqual((code_, status), ("forbidden", None))
        self.assertIn("permission denied", message)


def _python_for(user):
    """A python3 (3.9+) that user may run: ours if its path allows, else the system's."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if not cand or not os.path.exists(cand):
            continue
        try:
            r = subprocess.run([cand, "-I", "-c", "import sys; assert sys.version_info >= (3, 9)"],
                               user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
                               env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30)
        except OSError:
            continue
        if r.returncode == 0:
            return cand
    return None


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


if __name__ == "__main__":
    unittest.main()
