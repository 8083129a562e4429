"""A reward model behind HTTP, and the client a run uses to score responses with it.

Standard library only (http.server, urllib): the server holds one model, so the threaded server
serialises model calls with a lock; the client retries what may pass (timeouts, dropped
connections, 5xx) and fails fast on what will not (4xx).
"""

from __future__ import annotations

import hmac
import json
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.client import HTTPException
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock

import torch

from rayrlhf.data import reward_model_batch
from rayrlhf.errors import RewardError
from rayrlhf.modeling import default_device, infer_in_micro_batches, load_scalar_model, sequence_scores

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request far beyond any sane batch is refused before it is read


class _BadRequest(Exception):
    """A client mistake; its message goes back in the 400 reply."""


class RewardServer(ThreadingHTTPServer):
    """Holds the model, tokenizer and lock that the request handlers share."""

    daemon_threads = True  # a stuck request must not keep the process (or a test) alive

    def __init__(self, address: tuple[str, int], model, tokenizer, token: str, micro_batch_size: int,
                 device: torch.device):
        super().__init__(address, _Handler)
        self.model = model
        self.tokenizer = tokenizer
        self.token = token
        self.micro_batch_size = micro_batch_size
        self.device = device
        self.lock = Lock()

    def score(self, prompts: list[str], responses: list[str], chat_template: bool = False) -> list[float]:
        """The reward at each response's last token, of the texts tokenised as an in-process reward
        model with its own tokenizer does (data.reward_model_batch)."""
        if not prompts:
            return []
        # The lock covers tokenising too: a fast tokenizer is not safe to share across threads.
        with self.lock, torch.no_grad():
            batch = reward_model_batch(self.tokenizer, prompts, responses, chat_template)
            scores = infer_in_micro_batches(sequence_scores, self.model, batch, self.micro_batch_size,
                                            self.device)
        return scores.tolist()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def log_message(self, format: str, *args) -> None:
        """Silenced: one stderr line per request drowns a training log."""

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if not self.server.token:
            return True
        given = self.headers.get("Authorization", "")
        # Constant-time comparison, so the token cannot be guessed byte by byte from timings.
        if hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
            return True
        self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path}"})

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except _BadRequest as err:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/score":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path}"})
            return
        try:
            prompts, responses, chat_template = _parse_score_request(body)
        except _BadRequest as err:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        try:
            scores = self.server.score(prompts, responses, chat_template)
        except Exception as err:  # noqa: BLE001 - any model failure becomes a 500 the client can retry
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"scoring failed: {err!r}"})
            return
        self._reply(HTTPStatus.OK, {"scores": scores})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _BadRequest("a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise _BadRequest(f"body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
        return self.rfile.read(int(length))


def _parse_score_request(body: bytes) -> tuple[list[str], list[str], bool]:
    """prompts, responses, and chat_template (optional, false: wrap each prompt in the tokenizer's
    chat template as a user turn, as the run's data.chat_template does)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _BadRequest(f"body is not valid JSON: {err}") from None
    if not isinstance(request, dict):
        raise _BadRequest("body must be a JSON object with 'prompts' and 'responses'")
    for key in ("prompts", "responses"):
        if key not in request:
            raise _BadRequest(f"missing field '{key}'")
        value = request[key]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise _BadRequest(f"'{key}' must be a list of strings")
    prompts, responses = request["prompts"], request["responses"]
    if len(prompts) != len(responses):
        raise _BadRequest(f"'prompts' has {len(prompts)} items but 'responses' has {len(responses)}")
    chat_template = request.get("chat_template", False)
    if not isinstance(chat_template, bool):
        raise _BadRequest("'chat_template' must be true or false")
    return prompts, responses, chat_template


def make_server(model_path: str, host: str = "127.0.0.1", port: int = 0, token: str = "",
                dtype: str = "float32", micro_batch_size: int = 32) -> RewardServer:
    """Load the model once and bind; the caller runs serve_forever (port 0 picks a free port)."""
    from transformers import AutoTokenizer

    device = default_device()
    model = load_scalar_model(model_path, dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return RewardServer((host, port), model, tokenizer, token, micro_batch_size, device)


def serve(model_path: str, host: str = "127.0.0.1", port: int = 0, token: str = "",
          dtype: str = "float32", micro_batch_size: int = 32) -> None:
    """Serve until interrupted."""
    server = make_server(model_path, host, port, token, dtype, micro_batch_size)
    bound_host, bound_port = server.server_address[:2]
    print(f"reward server listening on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class RemoteRewardClient:
    """Scores (prompt, response) pairs on a RewardServer."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 30.0, retries: int = 2,
                 backoff_s: float = 0.5):
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"reward server URL '{url}' must start with http:// or https://")
        self.url = url.rstrip("/") + "/score"
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def score(self, prompts: list[str], responses: list[str], chat_template: bool = False) -> list[float]:
        reply = self._post({"prompts": list(prompts), "responses": list(responses),
                            "chat_template": chat_template})
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) for s in scores):
            raise RewardError(f"reward server {self.url} replied without a list of numeric 'scores'")
        if len(scores) != len(prompts):
            raise RewardError(f"reward server {self.url} returned {len(scores)} scores "
                              f"for {len(prompts)} prompts")
        return [float(s) for s in scores]

    def _post(self, payload: dict):
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}: {_error_detail(err)}"
                if err.code < 500:  # the same request would be refused again
                    raise RewardError(f"reward server {self.url} refused the request ({last})") from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as err:
                last = _describe(err.reason if isinstance(err, urllib.error.URLError) else err)
                continue
            try:
                return json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise RewardError(f"reward server {self.url} replied with invalid JSON: "
                                  f"{body[:200]!r}") from None
        raise RewardError(f"reward server {self.url} failed after {attempts} attempts; last error: {last}")


def _describe(reason: BaseException | str) -> str:
    """'TimeoutError: timed out' rather than a bare 'timed out' (some carry no message at all)."""
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return str(reason)


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's JSON 'error' when it sent one, else the HTTP reason."""
    try:
        return str(json.loads(err.read())["error"])
    except Exception:  # noqa: BLE001 - a proxy's HTML error page, an empty body, ...
        return str(err.reason)
