"""
A client for any OpenAI-compatible /chat/completions endpoint, over http.client (no SDK):

    client = ChatClient("http://HOST/v1", key, timeout_s=120, retries=4, backoff_s=2, max_wait_s=60)
    result, error = client.complete(body, parse)   # parse(reply text) -> object with .error ("" = ok)

timeout_s bounds each whole request (a watchdog closes the socket at the deadline, so a server
that trickles its reply cannot hold a thread longer); HTTP 408/409/425/429/5xx, timeouts,
connection errors and malformed replies are retried with exponential backoff, and a 429's
Retry-After is honoured up to max_wait_s; other HTTP errors are final. The key is sent as a
Bearer token and redacted from every error message. Thread-safe: reflect_data.py's OpenAI
teacher runs `concurrency` requests through one client.
"""
import base64
import email.utils
import http.client
import json
import mimetypes
import random
import socket
import threading
import time
import urllib.parse

MAX_REPLY_BYTES = 4 << 20  # a reply larger than this is refused (bounded cost per item)


class RetryableError(Exception):
    def __init__(self, msg, retry_after=None):
        super().__init__(msg)
        self.retry_after = retry_after  # seconds the server asked us to wait (HTTP 429 Retry-After)


def parse_retry_after(value):
    """Retry-After as seconds (a number of seconds or an HTTP date), or None if absent/unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    def __init__(self, url, key, timeout_s, retries, backoff_s, max_wait_s):
        url = url.rstrip("/")
        self.url = urllib.parse.urlsplit(url if url.endswith("/chat/completions") else url + "/chat/completions")
        if self.url.scheme not in ("http", "https") or not self.url.hostname:
            raise ValueError("expected http(s)://HOST[:PORT]/...")
        self.key, self.timeout_s, self.retries, self.backoff_s, self.max_wait_s = key, timeout_s, retries, backoff_s, max_wait_s

    def redact(self, s):
        return s.replace(self.key, "***") if self.key else s

    def post(self, body):
        """One request -> the reply text. Raises RetryableError or RuntimeError (do not retry).
        The whole request must finish within timeout_s: a watchdog shuts the socket down at the
        deadline, so a server that trickles its reply byte by byte cannot hold the thread (a socket
        timeout alone bounds each read, not their sum)."""
        u = self.url
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname, u.port, timeout=self.timeout_s)
        expired, sock = threading.Event(), []  # sock: kept here, since conn.sock is dropped once headers arrive

        def stop():
            expired.set()
            for s in sock:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes up a blocked read in the other thread
                except OSError:
                    pass
        watchdog = threading.Timer(self.timeout_s, stop)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            sock.append(conn.sock)
            if expired.is_set():  # the deadline passed while connecting, before stop() could see the socket
                raise RetryableError("timeout")
            conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
            r = conn.getresponse()
            status, retry_after = r.status, parse_retry_after(r.getheader("Retry-After"))
            raw = r.read(MAX_REPLY_BYTES + 1)  # the body is not read for errors: not ours to log (it may echo the request)
        except (OSError, http.client.HTTPException) as e:  # timeout, reset, remote closed, incomplete read
            if expired.is_set() or isinstance(e, (TimeoutError, socket.timeout)):
                raise RetryableError("timeout") from None
            raise RetryableError(f"connection error: {type(e).__name__}") from None
        finally:
            watchdog.cancel()
            conn.close()
        if expired.is_set():  # the watchdog ended the read (it looks like a short reply)
            raise RetryableError("timeout")
        if status != 200:
            if status in (408, 409, 425, 429) or status >= 500:
                raise RetryableError(f"HTTP {status}", retry_after if status == 429 else None)
            raise RuntimeError(f"HTTP {status}")  # 400/401/403/404...: retrying will not help
        if len(raw) > MAX_REPLY_BYTES:
            raise RuntimeError(f"reply larger than {MAX_REPLY_BYTES} bytes")
        try:
            c = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetryableError("malformed JSON") from None
        except (KeyError, IndexError, TypeError):
            raise RetryableError("no choices[0].message.content in reply") from None
        if isinstance(c, list):  # content as a list of parts
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
        if not isinstance(c, str):
            raise RetryableError("no choices[0].message.content in reply")
        return c

    def complete(self, body, parse, seed=0):
        """POST body, parse(reply text) -> (result, "") once a reply parses (result.error empty),
        else (None, the last error) after 1 + retries tries. Backoff jitter is seeded by `seed`."""
        rng = random.Random(seed)
        error, wait = "", None
        for k in range(self.retries + 1):
            if k:  # the server's Retry-After (bounded by max_wait_s) if it gave one, else exponential backoff
                time.sleep(min(wait, self.max_wait_s) if wait is not None
                           else self.backoff_s * 2 ** (k - 1) * (1 + 0.25 * rng.random()))
            try:
                result = parse(self.post(body))
                if not result.error:
                    return result, ""
                error, wait = result.error, None
            except RetryableError as e:
                error, wait = str(e), e.retry_after
            except RuntimeError as e:
                return None, self.redact(str(e))
        return None, self.redact(f"{error} (after {self.retries + 1} tries)")


def image_data_url(path, load_image):
    """data:<mime>;base64,... of an image file (re-encoded as PNG through load_image(path) -> a
    PIL image if its type is unknown)."""
    mime = mimetypes.guess_type(path)[0]
    if mime in ("image/png", "image/jpeg", "image/webp", "image/gif"):
        with open(path, "rb") as f:
            raw = f.read()
    else:
        import io
        buf = io.BytesIO()
        load_image(path).save(buf, format="PNG")
        raw, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(raw).decode()
