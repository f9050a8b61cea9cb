"""Python client of keyd, the daemon that leases Gemini API keys.

One file, standard library only, Python 3.9+. Copy it next to your code or
put clients/python on sys.path. It replaces the old Redis-backed
``KeyManager``: the call that picked a key keeps its shape, ::

    from keyd_client import KeyManager                  # was: from key_rotation import KeyManager
    km = KeyManager()
    key = km.select_key(model_preference="gemini-2.5-flash", tokens_needed=5000)
    key["key_id"], key["secret"], key["model"], key["lease_id"]

and each lease should then be reported, by hand (``km.report(...)``) or by
the context manager, which reports for you::

    with km.lease("gemini-2.5-flash", tokens_needed=1200) as lease:
        client = genai.Client(api_key=lease.secret)
        resp = client.models.generate_content(model=lease.model, contents=prompt)
        lease.usage = resp.usage_metadata

``async with km.lease(...)`` works the same in asyncio code.

What the context manager reports when the block ends:

1. ``lease.usage`` was set (or ``lease.call(...)`` returned): the call
   succeeded. Status 200 with the usage, whatever the block raises later.
2. The block raised an HTTP error of the Gemini API: an exception with an
   int ``code`` (100-599) and ``details``/``response_json``/``response``,
   as google-genai's ``errors.APIError`` (``ClientError``, ``ServerError``)
   has, or an httpx/requests error with ``response.status_code``. Its
   status and error body (``{"error": {...}}``) are reported, and keyd
   cools, exhausts or disables the bucket or key as the body means.
3. The block raised a network error (``OSError`` and so ``ConnectionError``,
   ``TimeoutError``, ``socket.timeout``; httpx/httpcore/urllib3/aiohttp
   transport errors; ``asyncio.TimeoutError``): status 0.
4. The block ended without raising and without setting ``lease.usage``:
   status 200 without usage.
5. The block raised anything else: "unused" (keyd refunds the reservation)
   unless ``lease.sent = True`` was set before the call, then status 0.

``lease.report(...)`` or ``lease.unused()`` inside the block reports
explicitly and the exit reports nothing more. The context manager never
swallows an exception: it reports, then the original exception goes on.
It never raises from its own report either: a failed report is logged as a
warning on the ``keyd_client`` logger and kept in ``lease.report_error``
(keyd then frees the lease when its TTL ends).

Errors: every refusal by keyd is a ``KeydError`` with ``.code`` (keyd's
stable code, e.g. ``"no_capacity"``), ``.message`` and ``.status`` (the
HTTP status; None for errors raised here); subclasses ``NoCapacity``
(``.retry_after`` seconds, or None when no retry will succeed without a
change), ``UnknownModel``, ``Forbidden`` and ``NotRunning``.

Secrets are never logged, and ``repr()``/``str()`` of a lease show only
the secret's last characters, as ``keyctl status`` does.
"""

import datetime
import http.client
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse

__all__ = [
    "KeyManager",
    "KeyLease",
    "Lease",
    "KeydError",
    "NoCapacity",
    "UnknownModel",
    "Forbidden",
    "NotRunning",
    "SYSTEM_SOCKET_PATH",
    "default_socket_path",
    "client_socket_path",
    "socket_path_from",
    "client_socket_path_from",
]

__version__ = "0.1.0"

log = logging.getLogger("keyd_client")

# Where the system service (systemd/keyd.service) listens.
SYSTEM_SOCKET_PATH = "/run/keyd/keyd.sock"

# The longest path a Unix socket address can hold (as keyd checks).
_SOCKET_PATH_MAX = 107

# Bound on the size of an answer read from keyd.
_MAX_RESPONSE = 64 << 20

# Idle keep-alive connections kept per KeyManager.
_MAX_IDLE = 16

# Extra time given to a lease request beyond its wait for capacity.
_WAIT_MARGIN = 10.0


# ---------------------------------------------------------------------------
# Socket path resolution: the same rules as keyd's api/socket.go.


def _clean(path):
    """Go's path.Clean."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    out = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    s = "/".join(out)
    if rooted:
        return "/" + s
    return s or "."


def _join(*elems):
    """Go's filepath.Join on Unix: non-empty elements joined, then cleaned."""
    parts = [e for e in elems if e]
    if not parts:
        return ""
    return _clean("/".join(parts))


def _go_tempdir(getenv):
    """Go's os.TempDir on Unix."""
    return getenv("TMPDIR") or "/tmp"


def socket_path_from(getenv, uid):
    """The socket path keyd listens on, from an environment and a uid:

    1. $KEYD_SOCKET
    2. $RUNTIME_DIRECTORY/keyd.sock (systemd RuntimeDirectory=keyd; the
       first of several colon-separated directories)
    3. /run/keyd/keyd.sock for root
    4. $XDG_RUNTIME_DIR/keyd/keyd.sock
    5. $TMPDIR (else /tmp)/keyd-$UID/keyd.sock

    ``getenv(name)`` returns the variable's value or None/"" when unset.
    """

    def env(name):
        return getenv(name) or ""

    p = env("KEYD_SOCKET")
    if p:
        return p
    d = env("RUNTIME_DIRECTORY")
    if d:
        return _join(d.split(":", 1)[0], "keyd.sock")
    if uid == 0:
        return SYSTEM_SOCKET_PATH
    d = env("XDG_RUNTIME_DIR")
    if d:
        return _join(d, "keyd", "keyd.sock")
    return _join(_go_tempdir(env), "keyd-%d" % uid, "keyd.sock")


def client_socket_path_from(getenv, uid, exists):
    """``socket_path_from`` for clients: when neither $KEYD_SOCKET nor
    $RUNTIME_DIRECTORY is set and the user's own socket does not exist, the
    system service's socket if that exists."""
    p = socket_path_from(getenv, uid)
    if getenv("KEYD_SOCKET") or getenv("RUNTIME_DIRECTORY") or p == SYSTEM_SOCKET_PATH:
        return p
    if not exists(p) and exists(SYSTEM_SOCKET_PATH):
        return SYSTEM_SOCKET_PATH
    return p


def _exists(path):
    try:
        os.stat(path)
        return True
    except (OSError, ValueError):
        return False


def default_socket_path():
    """The socket keyd listens on by default, for this process's environment."""
    return socket_path_from(os.environ.get, os.getuid())


def client_socket_path():
    """The socket a client dials by default (see client_socket_path_from)."""
    return client_socket_path_from(os.environ.get, os.getuid(), _exists)


# ---------------------------------------------------------------------------
# Errors.


class KeydError(Exception):
    """An error of keyd or of talking to it.

    code: keyd's stable error code ("no_capacity", "unknown_model",
        "forbidden", "bad_request", "no_keys", "tokens_exceed_tpm",
        "not_found", "shutting_down", ...) or, for errors raised by this
        client, "not_running", "timeout", "transport_error", "bad_response".
    message: what went wrong and, usually, the fix.
    status: the HTTP status keyd answered with; None when there was no answer.
    retry_after: seconds after which a retry can succeed, or None.
    """

    def __init__(self, message, code=None, status=None, retry_after=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after

    def __str__(self):
        return self.message

    def __repr__(self):
        return "%s(code=%r, status=%r, message=%r)" % (
            type(self).__name__, self.code, self.status, self.message)


class NoCapacity(KeydError):
    """Nothing can serve the model now. ``retry_after`` is the number of
    seconds (float) after which a retry can succeed, or None when none will
    until the configuration or a key's state changes."""


class UnknownModel(KeydError):
    """No configured key serves the model; the message lists the configured
    models and, for a near miss, says "did you mean ...?"."""


class Forbidden(KeydError):
    """This process's uid may not do that (the access section of keys.json),
    or the socket's file mode refused the connection."""


class NotRunning(KeydError):
    """Nothing listens on keyd's socket. ``socket_path`` is the path dialled."""

    def __init__(self, socket_path):
        super().__init__(
            "keyd is not running (socket %s): start it with "
            "`keyd --config keys.json` or `systemctl start keyd`" % socket_path,
            code="not_running")
        self.socket_path = socket_path


_ERROR_CLASSES = {
    "no_capacity": NoCapacity,
    "unknown_model": UnknownModel,
    "forbidden": Forbidden,
}

# keyd's code for a non-2xx answer whose body is not keyd's (as the Go client).
_CODE_FOR_STATUS = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "no_capacity",
    503: "shutting_down",
}


def _api_error(status, reason, headers, data):
    """The KeydError of a non-2xx answer."""
    err = None
    try:
        body = json.loads(data.decode("utf-8"))
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
    except (ValueError, UnicodeDecodeError):
        pass
    if err and isinstance(err.get("code"), str) and err["code"]:
        code = err["code"]
        message = str(err.get("message") or code)
    else:
        code = _CODE_FOR_STATUS.get(status, "internal")
        text = data.decode("utf-8", "replace").strip()
        if len(text) > 200:
            text = text[:200] + "\u2026"
        message = "keyd answered %d %s: %s" % (status, reason, text or "(empty body)")
        err = {}
    retry_after = None
    ms = err.get("retry_after_ms")
    if isinstance(ms, (int, float)) and not isinstance(ms, bool):
        retry_after = ms / 1000.0
    else:
        h = headers.get("Retry-After")
        if h and h.strip().isdigit():
            retry_after = float(int(h.strip()))
    cls = _ERROR_CLASSES.get(code, KeydError)
    return cls(message, code=code, status=status, retry_after=retry_after)


# ---------------------------------------------------------------------------
# The lease.


def _secret_hint(secret):
    """As keyd's SecretHint: an ellipsis and at most the last 4 characters,
    never more than half of the secret."""
    if not secret:
        return ""
    n = min(4, len(secret) // 2)
    return "\u2026" + (secret[len(secret) - n:] if n else "")


class KeyLease(dict):
    """A lease, as the seed's select_key returned it: a dict with key_id,
    secret, model, lease_id, plus project, tokens (the input tokens
    reserved) and expires_at (RFC 3339, UTC). Keys are also attributes
    (``lease.secret``). ``repr()`` and ``str()`` hide the secret."""

    __slots__ = ()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self):
        shown = dict(self)
        if "secret" in shown:
            shown["secret"] = _secret_hint(str(shown["secret"]))
        return "KeyLease(%r)" % (shown,)

    __str__ = __repr__

    def copy(self):
        return KeyLease(self)


_UNSET = object()


class Lease:
    """The context manager of ``KeyManager.lease``: takes a lease on entry
    and reports the call's outcome on exit (rules in the module docstring).

    Attributes: key_id, secret, model, lease_id, project, expires_at,
    tokens (also ``lease["secret"]``); ``info`` is the KeyLease. Set
    ``usage`` to the response's usage_metadata (or the response itself)
    once the call succeeded; set ``sent = True`` just before the call when
    code after it may raise something else. After the block, ``result`` is
    keyd's answer to the report (classification, action) and
    ``report_error`` the KeydError of a report that failed.
    """

    def __init__(self, manager, model, tokens_needed=None, workload_type=None, wait=None):
        self._manager = manager
        self._args = (model, tokens_needed, workload_type, wait)
        self.info = None
        self.sent = False
        self._usage = _UNSET
        self.result = None
        self.report_error = None
        self._reported = False

    # The lease's fields.
    def __getitem__(self, name):
        return self._need_info()[name]

    def _need_info(self):
        if self.info is None:
            raise RuntimeError("no lease yet: use `with km.lease(...) as lease:`")
        return self.info

    key_id = property(lambda self: self._need_info()["key_id"])
    secret = property(lambda self: self._need_info()["secret"])
    model = property(lambda self: self._need_info()["model"])
    lease_id = property(lambda self: self._need_info()["lease_id"])
    project = property(lambda self: self._need_info().get("project"))
    expires_at = property(lambda self: self._need_info().get("expires_at"))
    tokens = property(lambda self: self._need_info().get("tokens"))

    @property
    def usage(self):
        return None if self._usage is _UNSET else self._usage

    @usage.setter
    def usage(self, value):
        # Setting usage, even to None, says the call succeeded.
        self._usage = value

    @property
    def succeeded(self):
        """True once usage was set or call() returned."""
        return self._usage is not _UNSET

    @property
    def reported(self):
        return self._reported

    def __repr__(self):
        return "Lease(%r, reported=%r)" % (self.info, self._reported)

    def __enter__(self):
        model, tokens, workload, wait = self._args
        self.info = self._manager.select_key(
            model, tokens_needed=tokens, workload_type=workload, wait=wait)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._reported or self.info is None:
            return False
        if self.succeeded:
            try:
                usage = _normalize_usage(self.usage)
            except ValueError as e:  # report the success anyway, without usage
                log.warning("keyd: lease %s: %s", self.info.get("lease_id"), e)
                usage = None
            kw = {"status": 200, "usage": usage}
        else:
            kw = _outcome(exc, sent=self.sent)
        try:
            self._report(**kw)
        except KeydError as e:
            self.report_error = e
            log.warning("keyd: reporting lease %s (key %s) failed: %s",
                        self.info.get("lease_id"), self.info.get("key_id"), e)
        except Exception as e:  # never mask the block's outcome
            self.report_error = e
            log.warning("keyd: reporting lease %s (key %s) failed: %r",
                        self.info.get("lease_id"), self.info.get("key_id"), e)
        return False

    async def __aenter__(self):
        # For asyncio code (google-genai's client.aio): the same, with the
        # socket calls run in the loop's default executor.
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(None, self.__enter__)

    async def __aexit__(self, exc_type, exc, tb):
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(
            None, self.__exit__, exc_type, exc, tb)

    def _report(self, **kw):
        self._reported = True
        self.result = self._manager.report(self._need_info()["lease_id"], **kw)
        return self.result

    def report(self, status=None, error=None, usage=None, unused=False):
        """Report now, explicitly (see KeyManager.report); the exit then
        reports nothing more. Raises KeydError if keyd refuses."""
        self._need_info()
        return self._report(status=status, error=error, usage=usage, unused=unused)

    def unused(self):
        """Report that the call was never sent: keyd refunds the reservation."""
        return self.report(unused=True)

    def call(self, fn, *args, **kwargs):
        """Call ``fn(*args, **kwargs)`` (e.g. client.models.generate_content)
        as the lease's one call: marks the lease sent, and once fn returns
        takes the usage from the result's usage_metadata. Returns fn's result."""
        self.sent = True
        result = fn(*args, **kwargs)
        self.usage = getattr(result, "usage_metadata", None)
        return result


# ---------------------------------------------------------------------------
# Outcomes: what an exception or a usage means for a report.

_NETWORK_MODULES = ("httpx", "httpcore", "urllib3", "aiohttp", "requests", "h11", "h2")
_NETWORK_NAMES = {
    "TransportError", "TimeoutException", "NetworkError", "ConnectError",
    "ReadError", "WriteError", "RemoteProtocolError", "ProtocolError",
    "ClientConnectionError", "ServerDisconnectedError", "ConnectionError",
    "Timeout", "ReadTimeoutError", "NewConnectionError",
}


def _is_network_error(exc):
    if isinstance(exc, OSError):
        return True
    try:
        import asyncio
        import concurrent.futures
        if isinstance(exc, (asyncio.TimeoutError, concurrent.futures.TimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    for cls in type(exc).__mro__:
        mod = (getattr(cls, "__module__", "") or "").split(".", 1)[0]
        if mod in _NETWORK_MODULES and cls.__name__ in _NETWORK_NAMES:
            return True
    return False


def _http_status(exc):
    """The HTTP status of an API error exception, or None."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code if isinstance(exc.code, int) and 100 <= exc.code <= 599 else None
    code = getattr(exc, "code", None)
    if (isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599
            and any(hasattr(exc, a) for a in ("details", "response_json", "response"))):
        return code
    resp = getattr(exc, "response", None)
    sc = getattr(resp, "status_code", None)
    if isinstance(sc, int) and not isinstance(sc, bool) and 100 <= sc <= 599:
        return sc
    return None


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return json.loads(json.dumps(v, default=str))


def _error_body(exc, status):
    """The parsed Gemini error body carried by an API error exception."""
    for attr in ("details", "response_json"):
        v = getattr(exc, attr, None)
        if isinstance(v, (dict, str)) and v:
            return _jsonable(v)
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return _jsonable(v)
    if isinstance(exc, urllib.error.HTTPError):
        try:
            t = exc.read().decode("utf-8", "replace")
            if t.strip():
                return t
        except Exception:
            pass
    resp = getattr(exc, "response", None)
    if resp is not None:
        try:
            v = resp.json()
            if isinstance(v, (dict, list)) and v:
                return _jsonable(v)
        except Exception:
            pass
        try:
            t = resp.text
            if isinstance(t, str) and t.strip():
                return t
        except Exception:
            pass
    message = getattr(exc, "message", None) or str(exc)
    body = {"code": status, "message": str(message)}
    st = getattr(exc, "status", None)
    if isinstance(st, str) and st:
        body["status"] = st
    return {"error": body}


def _outcome(exc, sent=False):
    """The report (keyword arguments of KeyManager.report) for a lease whose
    block raised exc (None: ended normally) without a usage set."""
    if exc is None:
        return {"status": 200}
    if isinstance(exc, Exception):
        status = _http_status(exc)
        if status is not None:
            if 200 <= status <= 299:
                return {"status": status}
            return {"status": status, "error": _error_body(exc, status)}
        if _is_network_error(exc):
            return {"status": 0}
    if sent:
        return {"status": 0}
    return {"unused": True}


def _int_or_none(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v)
    return None


def _normalize_usage(usage):
    """keyd's usage dict from a dict (prompt_tokens/output_tokens/
    total_tokens, or Gemini's prompt_token_count/candidates_token_count/
    total_token_count in snake or camel case) or an object with those
    attributes (google-genai's usage_metadata, or a response carrying one).
    None when there is nothing to report."""
    if usage is None:
        return None
    if not isinstance(usage, dict) and not hasattr(usage, "prompt_token_count") \
            and hasattr(usage, "usage_metadata"):
        usage = usage.usage_metadata
        if usage is None:
            return None
    names = {
        "prompt": ("prompt_tokens", "prompt_token_count", "promptTokenCount"),
        "output": ("output_tokens", "candidates_token_count", "candidatesTokenCount"),
        "thoughts": ("thoughts_token_count", "thoughtsTokenCount"),
        "total": ("total_tokens", "total_token_count", "totalTokenCount"),
    }

    def get(which):
        for n in names[which]:
            if isinstance(usage, dict):
                v = usage.get(n)
            else:
                v = getattr(usage, n, None)
            v = _int_or_none(v)
            if v is not None:
                return v
        return None

    prompt, output, thoughts, total = get("prompt"), get("output"), get("thoughts"), get("total")
    if prompt is None and output is None and total is None:
        if isinstance(usage, dict) and usage:
            raise ValueError(
                "usage %r has no prompt_tokens/output_tokens/total_tokens "
                "(or prompt_token_count/candidates_token_count/total_token_count)"
                % sorted(usage))
        return None
    out = {"prompt_tokens": max(prompt or 0, 0)}
    if output is not None or thoughts is not None:
        out["output_tokens"] = max((output or 0) + (thoughts or 0), 0)
    if total is not None:
        out["total_tokens"] = max(total, 0)
    return out


# ---------------------------------------------------------------------------
# HTTP over the Unix socket.


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection to a Unix socket; the host is a placeholder."""

    def __init__(self, socket_path, timeout):
        super().__init__("keyd", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.socket_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


# Errors of a reused keep-alive connection that keyd closed meanwhile.
_STALE = (http.client.RemoteDisconnected, http.client.BadStatusLine,
          BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class KeyManager:
    """A client of keyd. Safe to share among threads; keeps connections
    alive between calls. Make one per process.

    socket_path: keyd's socket; None resolves it as keyd does
        (client_socket_path()).
    client_name: names this process in keyd's logs; default the script name.
    timeout: seconds to wait for an answer (a lease's ``wait`` is added).
    report_retry: seconds for which a report that cannot reach keyd (not
        running, e.g. restarting; the connection refused or reset) is
        resent, with backoff from 0.1 s doubling to 2 s; keyd answers a
        repeat as a duplicate. 0 disables the retries. Other failures (an
        answer from keyd, a timeout) are not retried.
    """

    def __init__(self, socket_path=None, client_name=None, timeout=30, report_retry=30.0):
        self.socket_path = os.fspath(socket_path) if socket_path else client_socket_path()
        if client_name is None:
            client_name = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "") or "python"
        self.client_name = client_name
        self.timeout = float(timeout)
        self.report_retry = max(float(report_retry or 0), 0.0)
        self._idle = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self):
        return "KeyManager(socket_path=%r)" % (self.socket_path,)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Close the kept-alive connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # -- leases --------------------------------------------------------------

    def select_key(self, model_preference=None, tokens_needed=None, workload_type=None, wait=None):
        """Lease a key for one call to the model ``model_preference``.

        tokens_needed: estimate of the request's input tokens (None: keyd's
            default_tokens).
        workload_type: only keys of that workload_type.
        wait: seconds to wait for capacity (None or 0: answer at once; at
            most 600).

        Returns a KeyLease (dict: key_id, secret, model, lease_id, project,
        tokens, expires_at). Raises NoCapacity, UnknownModel, Forbidden,
        NotRunning or another KeydError.
        """
        if not model_preference:
            raise KeydError(
                "model_preference is required: keyd leases a key for one model, "
                "e.g. select_key(model_preference=\"gemini-2.5-flash\")",
                code="bad_request")
        body = {"model": str(model_preference), "client": self.client_name}
        if tokens_needed is not None:
            body["tokens"] = int(tokens_needed)
        if workload_type:
            body["workload_type"] = str(workload_type)
        timeout = self.timeout
        if wait:
            body["wait_ms"] = int(round(float(wait) * 1000))
            timeout += max(float(wait), 0) + _WAIT_MARGIN
        out = self._do("POST", "/v1/leases", body, timeout=timeout)
        return KeyLease(out)

    def lease(self, model, tokens_needed=None, workload_type=None, wait=None):
        """A context manager that leases a key on entry and reports on exit::

            with km.lease("gemini-2.5-flash", tokens_needed=1200) as lease:
                resp = genai.Client(api_key=lease.secret).models.generate_content(
                    model=lease.model, contents=prompt)
                lease.usage = resp.usage_metadata
        """
        return Lease(self, model, tokens_needed, workload_type, wait)

    def report(self, lease_id, status=None, error=None, usage=None, unused=False):
        """Tell keyd how the call under a lease went.

        lease_id: the lease id, or the lease (KeyLease or Lease) itself.
        status: the HTTP status Gemini answered, 0 for a network error (no
            answer). Default: 200 when only usage is given; the exception's
            status when error is an exception.
        error: the Gemini error: the parsed JSON body ({"error": {...}}),
            its text, or the exception itself (google-genai's APIError, a
            network error).
        usage: the response's usage_metadata, the response, or a dict of
            prompt_tokens/output_tokens/total_tokens.
        unused: the call was never sent; keyd refunds the reservation.

        Returns keyd's answer: a dict with lease_id, key_id, classification
        (success, rate_minute, rate_day, ...) and action. Reporting twice is
        harmless (the answer then has duplicate=True), so a report that
        cannot reach keyd is resent for up to ``report_retry`` seconds.
        """
        lease_id = _lease_id_of(lease_id)
        if unused:
            if status is not None or error is not None or usage is not None:
                raise ValueError("report(unused=True) takes no status, error or usage")
            body = {"outcome": "unused"}
        else:
            if isinstance(error, BaseException):
                derived = _outcome(error, sent=True)
                if status is None:
                    status = derived.get("status", 0)
                error = derived.get("error")
            if status is None and isinstance(error, dict):
                inner = error.get("error") if isinstance(error.get("error"), dict) else error
                c = inner.get("code")
                if isinstance(c, int) and not isinstance(c, bool):
                    status = c
            if status is None:
                if usage is None:
                    raise ValueError(
                        "report needs status=, error=, usage= or unused=True")
                status = 200
            if isinstance(status, bool) or not isinstance(status, int):
                raise ValueError("status must be an int HTTP status or 0, got %r" % (status,))
            body = {"status": status}
            if error is not None:
                if isinstance(error, (bytes, bytearray)):
                    error = error.decode("utf-8", "replace")
                body["error"] = _jsonable(error)
            u = _normalize_usage(usage)
            if u is not None:
                body["usage"] = u
        path = "/v1/leases/%s/report" % urllib.parse.quote(lease_id, safe="")
        start = time.monotonic()
        delay = _REPORT_RETRY_FIRST
        while True:
            try:
                return self._do("POST", path, body)
            except KeydError as e:
                if (not _unreachable(e)
                        or time.monotonic() - start + delay > self.report_retry):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, _REPORT_RETRY_MAX)

    def report_and_reraise(self, lease, exc=None):
        """In an ``except`` block: report the exception being handled (or
        exc) as the lease's outcome by the context manager's rules, then
        re-raise it. A failed report is logged, never raised instead."""
        if exc is None:
            exc = sys.exc_info()[1]
        if exc is None:
            raise RuntimeError("report_and_reraise: no exception is being handled")
        try:
            sent = bool(getattr(lease, "sent", True))
            kw = _outcome(exc, sent=sent)
            if isinstance(lease, Lease):
                lease._report(**kw)
            else:
                self.report(lease, **kw)
        except Exception as e:
            log.warning("keyd: reporting lease %s failed: %s", _lease_id_of(lease), e)
        raise exc

    # -- reading -------------------------------------------------------------

    def health(self):
        """GET /v1/health: ok, version, keys_ready, keys_total."""
        return self._do("GET", "/v1/health")

    def status(self):
        """GET /v1/status: keys, buckets, usage against limits, config
        warnings. Holds no secret."""
        return self._do("GET", "/v1/status")

    def usage(self, since=None, key_id=None):
        """GET /v1/usage: hourly history since ``since`` (RFC 3339 string or
        aware datetime; default keyd's, the last 24 hours), of one key."""
        q = {}
        if since is not None:
            if hasattr(since, "isoformat"):
                since = since.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            q["since"] = since
        if key_id:
            q["key"] = key_id
        path = "/v1/usage" + ("?" + urllib.parse.urlencode(q) if q else "")
        return self._do("GET", path)

    def wait_ready(self, timeout=10.0):
        """Poll health until keyd answers; raise the last error on timeout."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                return self.health()
            except KeydError as e:
                if not (isinstance(e, NotRunning) or e.status == 503) or time.monotonic() >= deadline:
                    raise
            time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, 0.5)

    # -- transport -----------------------------------------------------------

    def _get_conn(self):
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle = []
                self._pid = os.getpid()
            if self._idle:
                return self._idle.pop(), True
        return UnixHTTPConnection(self.socket_path, self.timeout), False

    def _put_conn(self, conn):
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, conn):
        path = self.socket_path
        if len(path.encode()) > _SOCKET_PATH_MAX:
            raise KeydError(
                "socket path %s is %d bytes, over the limit of %d: use a shorter path"
                % (path, len(path.encode()), _SOCKET_PATH_MAX), code="transport_error")
        try:
            conn.connect()
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise NotRunning(path) from None
        except PermissionError as e:
            raise Forbidden(
                "permission denied connecting to keyd's socket %s: run as a member of "
                "the socket's group (keyd --socket-group) or as root" % path,
                code="forbidden") from e
        except socket.timeout as e:
            raise KeydError("connecting to keyd at %s timed out" % path, code="timeout") from e
        except OSError as e:
            raise KeydError("connecting to keyd at %s: %s" % (path, e),
                            code="transport_error") from e

    def _do(self, method, path, body=None, timeout=None):
        """One request; a 2xx answer's decoded JSON, else a KeydError."""
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        timeout = self.timeout if timeout is None else timeout
        route = path.split("?", 1)[0]
        for attempt in (0, 1):
            conn, reused = self._get_conn()
            if not reused:
                self._connect(conn)
            conn.timeout = timeout
            try:
                conn.sock.settimeout(timeout)
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read(_MAX_RESPONSE + 1)
            except _STALE as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # keyd closed the idle connection: once more, on a new one
                raise KeydError("talking to keyd at %s: %s %s: connection lost (%s)"
                                % (self.socket_path, method, route, _describe(e)),
                                code="transport_error") from e
            except socket.timeout as e:
                conn.close()
                raise KeydError("keyd at %s did not answer %s %s within %gs"
                                % (self.socket_path, method, route, timeout),
                                code="timeout") from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise KeydError("talking to keyd at %s: %s %s: %s"
                                % (self.socket_path, method, route, _describe(e)),
                                code="transport_error") from e
            except BaseException:
                conn.close()
                raise
            if len(raw) > _MAX_RESPONSE or resp.will_close or not resp.isclosed():
                conn.close()
            else:
                self._put_conn(conn)
            if len(raw) > _MAX_RESPONSE:
                raise KeydError("keyd's answer to %s %s is over %d bytes"
                                % (method, route, _MAX_RESPONSE), code="bad_response")
            if not 200 <= resp.status <= 299:
                raise _api_error(resp.status, resp.reason, resp.headers, raw)
            try:
                return json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise KeydError("decoding keyd's answer to %s %s: %s" % (method, route, e),
                                code="bad_response") from None
        raise AssertionError("unreachable")  # pragma: no cover


# Backoff between retries of a report that could not reach keyd.
_REPORT_RETRY_FIRST = 0.1
_REPORT_RETRY_MAX = 2.0


def _unreachable(e):
    """Whether the KeydError e is a failure to reach keyd (not running, the
    connection refused, reset or lost) rather than an answer or a timeout."""
    if isinstance(e, NotRunning):
        return True
    if e.code != "transport_error" or e.status is not None:
        return False
    cause = e.__cause__
    return (isinstance(cause, (OSError, http.client.HTTPException))
            and not isinstance(cause, (socket.timeout, TimeoutError)))


def _describe(e):
    s = str(e)
    return "%s: %s" % (type(e).__name__, s) if s else type(e).__name__


def _lease_id_of(lease):
    if isinstance(lease, Lease):
        return lease.lease_id
    if isinstance(lease, dict):
        return lease["lease_id"]
    if not isinstance(lease, str) or not lease:
        raise ValueError("lease_id must be a lease id string or a lease, got %r" % (lease,))
    return lease


