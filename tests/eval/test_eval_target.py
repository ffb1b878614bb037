import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from longserve.errors import LongserveError
from longserve.eval.target import EndpointError, EvalRequest, OpenAITarget, Target, estimate_tokens


class _Handler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible server: echoes the prompt's last word, streamed or not."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
        else:
            self._send(404, "{}")

    def do_POST(self):
        state = self.server.state
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state["lock"]:
            state["posts"].append((self.path, payload))
            if state["fail"] > 0:
                state["fail"] -= 1
                return self._send(500, '{"error": {"message": "overloaded"}}')
        if state["status"] != 200:
            return self._send(state["status"], '{"error": {"message": "prompt too long"}}')
        prompt = payload["messages"][0]["content"]
        words = ["echo", prompt.split()[-1]]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words)}
        if not payload.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            body = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}
            return self._send(200, json.dumps(body))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}}]}
            for i, w in enumerate(words)
        ]
        chunks[-1]["choices"][0]["finish_reason"] = "length"
        chunks.append({"choices": [], "usage": usage})
        for chunk in chunks:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.005)
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = {"posts": [], "fail": 0, "status": 200, "lock": threading.Lock()}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server, suffix=""):
    return f"http://127.0.0.1:{server.server_address[1]}{suffix}"


REQUESTS = [EvalRequest(f"context {i} " * 5, f"question{i}", 8, "query_agnostic") for i in range(3)]


def test_streaming_chat_completions(server):
    with OpenAITarget(_url(server), concurrency=2, backoff_s=0.001) as target:
        assert isinstance(target, Target)
        results = target.answer(REQUESTS)
    assert [r.text for r in results] == ["echo question0", "echo question1", "echo question2"]
    assert all(
        r.prompt_tokens == 11 and r.ttft_s > 0 and r.decode_tok_s > 0 and r.kv_bytes == 0 for r in results
    )
    assert results[0].extra["setting"] == "query_agnostic" and results[0].extra["setting_applied"] is False
    assert results[0].extra["finish_reason"] == "length"
    path, payload = server.state["posts"][0]
    assert path == "/v1/chat/completions"
    assert payload["model"] == "fake-model" and payload["max_tokens"] == 8 and payload["temperature"] == 0.0
    assert sorted(p["messages"][0]["content"] for _, p in server.state["posts"]) == sorted(
        r.context + r.question for r in REQUESTS
    )


def test_non_streaming(server):
    with OpenAITarget(_url(server, "/v1/"), model="m", stream=False) as target:
        (result,) = target.answer(REQUESTS[:1])
    assert result.text == "echo question0" and result.decode_tok_s == 0.0
    assert result.ttft_s == pytest.approx(result.extra["latency_s"])
    assert server.state["posts"][0][1]["model"] == "m"


def test_retries_5xx_then_succeeds(server):
    server.state["fail"] = 2
    with OpenAITarget(_url(server), model="m", max_retries=3, backoff_s=0.001) as target:
        (result,) = target.answer(REQUESTS[:1])
    assert result.text == "echo question0"
    assert len(server.state["posts"]) == 3


def test_4xx_is_not_retried(server):
    server.state["status"] = 400
    target = OpenAITarget(_url(server), model="m", max_retries=3, backoff_s=0.001)
    with target, pytest.raises(EndpointError, match=r"rejected the request \(HTTP 400\).*prompt too long"):
        target.answer(REQUESTS[:1])
    assert len(server.state["posts"]) == 1


def test_persistent_5xx_gives_endpoint_error(server):
    server.state["fail"] = 100
    target = OpenAITarget(_url(server), model="m", max_retries=2, backoff_s=0.001)
    with target, pytest.raises(EndpointError, match="failed after 3 attempts.*HTTP 500"):
        target.answer(REQUESTS[:1])
    assert len(server.state["posts"]) == 3


def test_unreachable_endpoint():
    with socket.socket() as s:  # find a port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with OpenAITarget(url, max_retries=2, backoff_s=0.001, timeout_s=5) as target:
        start = time.perf_counter()
        with pytest.raises(
            EndpointError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions failed after 3 attempts"
        ) as e:
            target.answer(REQUESTS[:2])
        assert time.perf_counter() - start < 5
    assert isinstance(e.value, LongserveError) and e.value.status_code == 502


def test_urls_and_token_counts():
    assert OpenAITarget("http://h:1").url == "http://h:1/v1/chat/completions"
    assert OpenAITarget("http://h:1/v1").url == "http://h:1/v1/chat/completions"
    assert OpenAITarget("http://h:1/v1/chat/completions").url == "http://h:1/v1/chat/completions"
    assert estimate_tokens("") == 0 and estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert OpenAITarget("http://h:1").count_tokens("a" * 40) == 10

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return text.split() + (["<s>"] if add_special_tokens else [])

    assert OpenAITarget("http://h:1", tokenizer=Tok()).count_tokens("a b c") == 3
