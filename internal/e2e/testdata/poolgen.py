"""A Python load generator for keyd's end-to-end pool test (pool_test.go).

It is what a real generator does with keyd_client: lease a key, call the
Gemini API's REST endpoint with it (here the fake's, with plain urllib),
report the outcome. WORKERS threads loop until told to stop.

Environment:
  POOLGEN_CLIENT_DIR  the directory of keyd_client.py (clients/python)
  POOLGEN_SOCKET      keyd's socket
  POOLGEN_BASE_URL    the Gemini API's base URL, e.g. http://127.0.0.1:PORT
  POOLGEN_MODEL       the model
  POOLGEN_NAME        this generator's name
  POOLGEN_WORKERS     threads
  POOLGEN_LONG_PROMPT the prompt of worker 0's first call (the fake answers
                      it slowly: a long generation in flight across keyd's
                      restart); the others send short prompts
  POOLGEN_LONG_WITHIN seconds after "go" within which that first call may
                      still be the long one

Protocol on stdin/stdout: prints {"event":"ready"} once keyd answers, waits
for a line on stdin ("go"), then works; EOF on stdin means stop: no new
lease is asked for, what was leased is used and reported, then it exits.
Every outcome is one JSON line on stdout:

  {"event":"call", "lease":ID, "key":K, "status":S, "class":C, "dup":B,
   "resp":RESPONSE_ID, "report_tries":N, "grant_ns":NS, ...}
  {"event":"lease_error", "code":CODE, "error":MSG}   keyd down, or other
  {"event":"report_error", "lease":ID, "code":CODE, "error":MSG}

A report that fails because keyd is not answering (it was killed and is
coming back) is retried until keyd answers, for up to 60 s: a generator
must not lose the outcome of a call that Gemini counted.
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.environ["POOLGEN_CLIENT_DIR"])

from keyd_client import KeydError, KeyManager, NoCapacity, NotRunning  # noqa: E402

SOCKET = os.environ["POOLGEN_SOCKET"]
BASE = os.environ["POOLGEN_BASE_URL"].rstrip("/")
MODEL = os.environ["POOLGEN_MODEL"]
NAME = os.environ["POOLGEN_NAME"]
WORKERS = int(os.environ["POOLGEN_WORKERS"])
LONG_PROMPT = os.environ["POOLGEN_LONG_PROMPT"]
LONG_WITHIN = float(os.environ["POOLGEN_LONG_WITHIN"])

# keyd's wait for capacity per lease request: short, so that a stop is
# noticed soon; the worker asks again at once.
LEASE_WAIT = 2.0
# Codes of a keyd that is not answering: retry.
DOWN = {"not_running", "transport_error", "timeout", "shutting_down"}

out_lock = threading.Lock()
stop = threading.Event()
go_at = [0.0]


def emit(**rec):
    rec.setdefault("gen", NAME)
    rec.setdefault("lang", "py")
    line = json.dumps(rec, sort_keys=True)
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def tokens_of(text):
    # The fake counts ceil(runes/4) per text part; err high.
    return (len(text) + 3) // 4 + 16


def call_gemini(secret, prompt):
    """One generateContent call. Returns (status, body as JSON or text)."""
    url = "%s/v1beta/models/%s:generateContent" % (BASE, MODEL)
    data = json.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}]}).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "x-goog-api-key": secret})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read().decode())
    except urllib.error.HTTPError as e:
        raw = e.read().decode("utf-8", "replace")
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


def report(km, lease_id, kw):
    """Report, retrying while keyd is not answering. Returns (answer, tries)."""
    deadline = time.monotonic() + 60
    tries = 0
    while True:
        tries += 1
        try:
            return km.report(lease_id, **kw), tries
        except KeydError as e:
            if e.code in DOWN and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise


def worker(km, w):
    first = True
    i = 0
    while not stop.is_set():
        i += 1
        long_call = w == 0 and first and time.monotonic() - go_at[0] < LONG_WITHIN
        prompt = LONG_PROMPT if long_call else "%s worker %d request %d: say something short." % (NAME, w, i)
        try:
            lease = km.select_key(model_preference=MODEL, tokens_needed=tokens_of(prompt), wait=LEASE_WAIT)
        except NoCapacity:
            continue  # the wait ran out: ask again (keyd said when; it holds the next one)
        except KeydError as e:
            emit(event="lease_error", code=e.code, error=str(e))
            if e.code in DOWN:
                time.sleep(0.1)
                continue
            time.sleep(0.5)
            continue
        t_send = time.time()
        try:
            status, body = call_gemini(lease["secret"], prompt)
        except OSError as e:  # no answer: status 0, no penalty
            status, body = 0, str(e)
        t_done = time.time()
        resp_id = None
        if status == 200:
            first = False  # the long call is the first that the model answers
            resp_id = body.get("responseId")
            kw = {"status": 200, "usage": body.get("usageMetadata")}
        elif status == 0:
            kw = {"status": 0}
        else:
            kw = {"status": status, "error": body}
        rec = dict(event="call", worker=w, lease=lease["lease_id"], key=lease["key_id"],
                   status=status, resp=resp_id, long=long_call,
                   grant_ns=int(lease["lease_id"][1:17], 16),
                   t_send=t_send, t_done=t_done)
        try:
            ans, tries = report(km, lease["lease_id"], kw)
        except KeydError as e:
            emit(event="report_error", lease=lease["lease_id"], key=lease["key_id"],
                 status=status, code=e.code, error=str(e))
            continue
        rec.update(report_tries=tries, t_reported=time.time(),
                   dup=bool(ans.get("duplicate")), **{"class": ans.get("classification")})
        emit(**rec)


def main():
    km = KeyManager(socket_path=SOCKET, client_name=NAME, timeout=30)
    km.wait_ready(timeout=30)
    emit(event="ready")
    if not sys.stdin.readline():
        return 0
    go_at[0] = time.monotonic()
    threads = [threading.Thread(target=worker, args=(km, w), daemon=True) for w in range(WORKERS)]
    for t in threads:
        t.start()
    sys.stdin.read()  # EOF: stop
    stop.set()
    for t in threads:
        t.join(timeout=150)
    alive = sum(t.is_alive() for t in threads)
    emit(event="done", stuck=alive)
    km.close()
    return 0 if alive == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
