"""The HTTP reward server and its client, over loopback on ports the OS picks."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoTokenizer

from rayrlhf.batch import build_batch
from rayrlhf.errors import RewardError
from rayrlhf.modeling import load_scalar_model, sequence_scores
from rayrlhf.reward_server import MAX_BODY_BYTES, RemoteRewardClient, RewardServer, build_app, make_server

PROMPTS = ["what is 2+2?", "name a colour.", "say hi"]
RESPONSES = ["4", "blue, or maybe green", "hi there!"]


@pytest.fixture(scope="module")
def reward_path(tmp_path_factory) -> str:
    from rayrlhf.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("reward_server") / "reward", kind="reward", seed=1))


def in_process_scores(path: str, prompts: list[str], responses: list[str]) -> list[float]:
    """The reference: the same texts scored without HTTP."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_scalar_model(path, "float32").eval()
    batch = build_batch(tokenizer(prompts).input_ids,
                        tokenizer(responses, add_special_tokens=False).input_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        return sequence_scores(model, batch).tolist()


@contextmanager
def running(server: ThreadingHTTPServer) -> Iterator[str]:
    """Serve a fake server in a daemon thread; yield the base URL; shut down however the test ends."""
    # A short poll interval: shutdown() waits up to one interval for the loop to notice.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _FakeServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler still asleep must not hold the test process open


def fake_server(do_post) -> tuple[_FakeServer, list[int]]:
    """A stand-in reward server whose POST handler is `do_post(handler, call_number)`."""
    calls: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(len(calls))
            do_post(self, len(calls))

    return _FakeServer(("127.0.0.1", 0), Handler), calls


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_scores_match_in_process(reward_path):
    with make_server(reward_path) as server:
        scores = RemoteRewardClient(server.url).score(PROMPTS, RESPONSES)
    assert scores == pytest.approx(in_process_scores(reward_path, PROMPTS, RESPONSES), abs=1e-5)


def test_batch_longer_than_micro_batch(reward_path):
    prompts, responses = PROMPTS * 3, [r + "!" * i for i, r in enumerate(RESPONSES * 3)]
    with make_server(reward_path, micro_batch_size=2) as server:
        scores = RemoteRewardClient(server.url + "/").score(prompts, responses)
    assert len(scores) == 9
    assert scores == pytest.approx(in_process_scores(reward_path, prompts, responses), abs=1e-5)


def test_concurrent_requests(reward_path):
    """The server takes the requests at once; the lock keeps the model calls apart."""
    expected = in_process_scores(reward_path, PROMPTS, RESPONSES)
    results: list[list[float]] = []
    with make_server(reward_path) as server:
        client = RemoteRewardClient(server.url)
        threads = [threading.Thread(target=lambda: results.append(client.score(PROMPTS, RESPONSES)))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert len(results) == 6
    for scores in results:
        assert scores == pytest.approx(expected, abs=1e-5)


def test_health_404_and_malformed_json(reward_path):
    with make_server(reward_path) as server:
        url = server.url
        with urllib.request.urlopen(url + "/health", timeout=5) as reply:
            assert json.loads(reply.read()) == {"status": "ok"}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/nope", timeout=5)
        assert err.value.code == 404
        request = urllib.request.Request(url + "/score", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 400
        assert "not valid JSON" in json.loads(err.value.read())["error"]
        request = urllib.request.Request(url + "/score", data=b'{"prompts": []}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert "responses" in json.loads(err.value.read())["error"]


def test_token(reward_path):
    with make_server(reward_path, token="s3cret") as server:
        url = server.url
        assert len(RemoteRewardClient(url, token="s3cret").score(PROMPTS, RESPONSES)) == 3
        for token in ("", "wrong"):
            # A long backoff would show up in the elapsed time if a 401 were retried.
            client = RemoteRewardClient(url, token=token, retries=2, backoff_s=5.0)
            start = time.monotonic()
            with pytest.raises(RewardError, match="401"):
                client.score(PROMPTS, RESPONSES)
            assert time.monotonic() - start < 2.0


def test_mismatched_lengths_is_400(reward_path):
    with make_server(reward_path) as server:
        with pytest.raises(RewardError, match="400") as err:
            RemoteRewardClient(server.url, backoff_s=5.0).score(PROMPTS, RESPONSES[:2])
    assert "3 items" in str(err.value) and "has 2" in str(err.value)


class StubModel:
    """Scores without a model, for what the server checks before and after the model call."""

    def __init__(self, score: float):
        self.value = score

    def score(self, prompts: list[str], responses: list[str], chat_template: bool = False) -> list[float]:
        return [self.value] * len(prompts)


def raw_post(url: str, path: str, headers: dict[str, str], body=None) -> tuple[int, str]:
    """Status and JSON 'error' of a request urllib would not send (a chunked body, a false length)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.putrequest("POST", path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())["error"]
    finally:
        conn.close()


def test_refused_before_the_body_is_read():
    """Too big a body (by its Content-Length) or none declared: 400 unread; then a wrong token: 401,
    on any path; a bad field: 400 naming it."""
    with RewardServer(build_app(StubModel(0.0), token="s3cret")) as server:
        auth = {"Authorization": "Bearer s3cret"}
        status, error = raw_post(server.url, "/score", {**auth, "Content-Length": str(MAX_BODY_BYTES + 1)})
        assert status == 400 and f"{MAX_BODY_BYTES}-byte limit" in error
        status, error = raw_post(server.url, "/score", {**auth, "Transfer-Encoding": "chunked"},
                                 b"2\r\n{}\r\n0\r\n\r\n")
        assert status == 400 and "Content-Length" in error
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/nope", timeout=5)
        assert err.value.code == 401
        body = b'{"prompts": ["a"], "responses": ["b"], "chat_template": 1}'
        status, error = raw_post(server.url, "/score", {**auth, "Content-Length": str(len(body))}, body)
        assert status == 400 and error == "'chat_template' must be true or false"
        status, _ = raw_post(server.url, "/nope", {**auth, "Content-Length": "2"}, b"{}")
        assert status == 404


def test_nan_score_reaches_the_client():
    """A model's NaN is the run's to report as unusable, not a server error retried to the end."""
    with RewardServer(build_app(StubModel(math.nan))) as server:
        scores = RemoteRewardClient(server.url, retries=0).score(["a"], ["b"])
    assert math.isnan(scores[0])


def test_timeout_gives_up_after_retries():
    def sleep_past_the_timeout(handler: BaseHTTPRequestHandler, call: int) -> None:
        time.sleep(2.0)
        try:
            send_json(handler, 200, {"scores": [0.0]})
        except OSError:  # the client has long since hung up
            pass

    server, calls = fake_server(sleep_past_the_timeout)
    with running(server) as url:
        client = RemoteRewardClient(url, timeout_s=0.3, retries=1, backoff_s=0.01)
        start = time.monotonic()
        with pytest.raises(RewardError) as err:
            client.score(["p"], ["r"])
        elapsed = time.monotonic() - start
        # The second connection was accepted; on a loaded machine its handler may start late.
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert url + "/score" in str(err.value)
    assert "after 2 attempts" in str(err.value)
    assert "timed out" in str(err.value)
    assert elapsed < 1.8
    assert len(calls) == 2


def test_retries_after_500():
    def fail_once(handler: BaseHTTPRequestHandler, call: int) -> None:
        if call == 1:
            send_json(handler, 500, {"error": "warming up"})
        else:
            send_json(handler, 200, {"scores": [0.5, -1.0]})

    server, calls = fake_server(fail_once)
    with running(server) as url:
        scores = RemoteRewardClient(url, retries=2, backoff_s=0.01).score(["a", "b"], ["c", "d"])
    assert scores == [0.5, -1.0]
    assert len(calls) == 2


def test_wrong_number_of_scores():
    server, _ = fake_server(lambda handler, call: send_json(handler, 200, {"scores": [1.0]}))
    with running(server) as url:
        with pytest.raises(RewardError, match="1 scores for 2 prompts"):
            RemoteRewardClient(url).score(["a", "b"], ["c", "d"])
