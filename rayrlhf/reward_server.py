"""A reward model behind HTTP, and the client a run uses to score responses with it.

The server is a FastAPI app under uvicorn, so that routing, the request's schema (a strict pydantic
model) and an HTTP/1.1 server with keep-alive and a graceful shutdown (requests in flight finish on
SIGTERM or stop()) are maintained code rather than ours. The event loop takes requests concurrently;
each model call runs in a worker thread under one lock, as the server holds one model. The client
stays on urllib: one POST per call needs no dependency. It retries what may pass (timeouts, dropped
connections, 5xx) and fails fast on what will not (4xx).
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.client import HTTPException

import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayrlhf.data import reward_model_batch
from rayrlhf.errors import RewardError
from rayrlhf.modeling import default_device, infer_in_micro_batches, load_scalar_model, sequence_scores

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request far beyond any sane batch is refused before it is read


class RewardModel:
    """The model, its tokenizer and the lock that serialises the requests' model calls."""

    def __init__(self, model, tokenizer, micro_batch_size: int, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.device = device
        self.lock = threading.Lock()

    def score(self, prompts: list, responses: list[str], chat_template: bool = False) -> list[float]:
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


class Message(BaseModel):
    model_config = ConfigDict(strict=True)

    role: str
    content: str


class ScoreRequest(BaseModel):
    """POST /score: prompts (strings, or conversations: lists of {role, content} messages, which
    go through the tokenizer's chat template), responses, and chat_template (optional, false: wrap
    each string prompt in the chat template as a user turn, as the run's data.chat_template does)."""

    # Strict: 1 is not true nor 3 a string; a client sending them has a bug worth a 400.
    model_config = ConfigDict(strict=True)

    prompts: list[str | list[Message]]
    responses: list[str]
    chat_template: bool = False


def _reply(status: int, payload: dict, headers: dict[str, str] | None = None) -> Response:
    # json.dumps, not JSONResponse (which refuses NaN): a model's NaN score must reach the run, which
    # reports the sample as unusable, rather than become a 500 retried to the end.
    return Response(json.dumps(payload), status, headers, media_type="application/json")


def _parse_score_request(body: bytes) -> ScoreRequest:
    """The request, or a 400 whose message names what is wrong (pydantic's first error)."""
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError as err:
        error = err.errors()[0]
        field = error["loc"][0] if error["loc"] else None
        if error["type"] == "json_invalid":
            message = f"body is not valid JSON: {error['ctx']['error']}"
        elif field is None:
            message = "body must be a JSON object with 'prompts' and 'responses'"
        elif error["type"] == "missing":
            message = f"missing field '{field}'"
        elif field == "chat_template":
            message = "'chat_template' must be true or false"
        elif field == "prompts":
            message = "'prompts' must be a list of strings or of conversations ([{\"role\": ..., " \
                      "\"content\": ...}])"
        else:
            message = f"'{field}' must be a list of strings"
        raise StarletteHTTPException(HTTPStatus.BAD_REQUEST, message) from None
    if len(request.prompts) != len(request.responses):
        raise StarletteHTTPException(HTTPStatus.BAD_REQUEST, f"'prompts' has {len(request.prompts)} items "
                                                             f"but 'responses' has {len(request.responses)}")
    return request


def build_app(model: RewardModel, token: str = "") -> FastAPI:
    """GET /health and POST /score, behind a bearer token when one is given; errors are {"error": ...}."""
    # No /docs, /redoc nor /openapi.json: the server answers on its two endpoints only.
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def refuse_early(request: Request, call_next) -> Response:
        """Refusals that need neither the body nor a route: too big a body, then a wrong token."""
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return _reply(HTTPStatus.BAD_REQUEST, {"error": "a Content-Length header is required"})
            if int(length) > MAX_BODY_BYTES:
                return _reply(HTTPStatus.BAD_REQUEST,
                              {"error": f"body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit"})
        # Constant-time comparison, so the token cannot be guessed byte by byte from timings.
        if token and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return _reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"},
                          {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        not_found = err.status_code == HTTPStatus.NOT_FOUND
        message = f"unknown path {request.url.path}" if not_found else err.detail
        return _reply(err.status_code, {"error": message}, err.headers)

    @app.get("/health")
    async def health() -> Response:
        return _reply(HTTPStatus.OK, {"status": "ok"})

    @app.post("/score")
    async def score(request: Request) -> Response:
        # The body is read and validated here rather than declared as a parameter: FastAPI would want
        # a JSON Content-Type, which the server has never required.
        parsed = _parse_score_request(await request.body())
        try:
            # In a worker thread, so the event loop keeps taking requests while the model runs.
            prompts = [p if isinstance(p, str) else [m.model_dump() for m in p] for p in parsed.prompts]
            scores = await run_in_threadpool(model.score, prompts, parsed.responses, parsed.chat_template)
        except Exception as err:  # noqa: BLE001 - any model failure becomes a 500 the client can retry
            return _reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"scoring failed: {err!r}"})
        return _reply(HTTPStatus.OK, {"scores": scores})

    return app


class RewardServer:
    """An app under uvicorn, on a socket bound (and listening) at construction: the port is known
    before serving (port 0 picks a free one), a taken one fails here, and a request sent before
    uvicorn is up waits in the backlog."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.socket = socket.create_server((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        # Quiet, as a training log needs: no line per request nor banner; errors still reach stderr.
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, lifespan="off", access_log=False,
                                                      log_level="warning"))
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve in this thread until stop() or, in the main thread, SIGINT or SIGTERM (which uvicorn
        handles, then raises again once shut down)."""
        self._uvicorn.run(sockets=[self.socket])

    def start(self) -> RewardServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="reward-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Let the requests in flight finish, then close the socket and wait for the serving thread."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.socket.close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def make_server(model_path: str, host: str = "127.0.0.1", port: int = 0, token: str = "",
                dtype: str = "float32", micro_batch_size: int = 32) -> RewardServer:
    """Load the model once and bind; the caller serves (serve_forever, or start and stop)."""
    from transformers import AutoTokenizer

    device = default_device()
    model = load_scalar_model(model_path, dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return RewardServer(build_app(RewardModel(model, tokenizer, micro_batch_size, device), token), host, port)


def serve(model_path: str, host: str = "127.0.0.1", port: int = 0, token: str = "",
          dtype: str = "float32", micro_batch_size: int = 32) -> None:
    """Serve until interrupted."""
    server = make_server(model_path, host, port, token, dtype, micro_batch_size)
    print(f"reward server listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C, which uvicorn raises again once it has shut down
        pass


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

    def score(self, prompts: list, responses: list[str], chat_template: bool = False) -> list[float]:
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
