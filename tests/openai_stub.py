"""A real HTTP server on loopback that speaks enough of the OpenAI API for CRG mining tests.

Endpoints: POST /v1/chat/completions, POST /v1/files (multipart), GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches/{id}. The real `openai` client talks to it over TCP; nothing of
the client is patched.

Scripting is per target class (read back from the prompt's "New category:" line):
  stub.answers["dog"] = ["answer to the 1st successful call", "2nd", "3rd"]   # then repeats the last
  stub.faults["dog"] = ["429", "500", "slow", "badjson"]    # consumed one per request, before answers
  stub.default = callable(target, candidates) -> str         # for unscripted targets
Faults: "429" (with Retry-After: stub.retry_after seconds), "500", "503", "400", "slow" (sleeps
stub.slow_s before answering, longer than the client's timeout), "badjson" (200 with a truncated
body). Everything received is logged in stub.log (method, path, target, authorization header).
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def target_and_candidates(prompt: str) -> tuple[str, list[str]]:
    """The last "New category:" / "Known categories:" lines (the first pair is the worked example)."""
    t = prompt.rfind("New category:")
    k = prompt.rfind("Known categories:")
    target = prompt[t + len("New category:"):].split("\n", 1)[0].strip()
    cands = prompt[k + len("Known categories:"):].split("\n", 1)[0].strip()
    return target, [c.strip() for c in cands.split(",") if c.strip()]


def entry(n: int, name: str, strength: str, kind: str = "Co-occurrence") -> str:
    """One well-formed answer entry in the App. C.4 format."""
    return (f"Related Category {n}: {name}\n- **Type of Relationship:** {kind}\n"
            f"- **Association Strength:** {strength}\n- **Explanation:** because.\n")


def answer(*pairs: tuple[str, str]) -> str:
    return "\n".join(entry(i, name, s) for i, (name, s) in enumerate(pairs, 1))


class OpenAIStub:
    def __init__(self, retry_after: str = "1", slow_s: float = 3.0, batch_polls: int = 2):
        self.answers: dict[str, list[str]] = {}
        self.faults: dict[str, list[str]] = {}
        self.default = lambda target, cands: "I could not find any related categories in the list. No related categories."
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.batch_polls = batch_polls
        self.delay = 0.0  # seconds every chat answer takes (to observe concurrency)
        self.in_flight = 0
        self.max_in_flight = 0
        self.log: list[dict] = []
        self.served: dict[str, int] = {}  # target -> successful answers served
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle ------------------------------------------------------------
    def __enter__(self) -> "OpenAIStub":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                stub._handle(self, "POST")

            def do_GET(self):
                stub._handle(self, "GET")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ---- counters used by the tests --------------------------------------------
    def chat_calls(self, target: str | None = None) -> int:
        return sum(1 for r in self.log if r["path"] == "/v1/chat/completions" and (target is None or r["target"] == target))

    def calls(self, path_prefix: str) -> int:
        return sum(1 for r in self.log if r["path"].startswith(path_prefix))

    def batch_lines(self, target: str | None = None) -> int:
        return sum(1 for r in self.log if r["path"] == "batch-line" and (target is None or r["target"] == target))

    def chat_requests(self, target: str) -> list[dict]:
        return [r for r in self.log if r["path"] == "/v1/chat/completions" and r["target"] == target]

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    # ---- behaviour ------------------------------------------------------------
    def _next(self, target: str) -> tuple[str, str | None]:
        """('fault', kind) or ('answer', text) for the next request about `target`."""
        with self._lock:
            q = self.faults.get(target)
            if q:
                return "fault", q.pop(0)
            n = self.served.get(target, 0)
            self.served[target] = n + 1
        script = self.answers.get(target)
        return "answer", (script[min(n, len(script) - 1)] if script else None)

    def _chat_body(self, body: dict) -> tuple[int, dict, dict]:
        """(status, json body, extra headers) for one chat-completions request body."""
        prompt = body["messages"][-1]["content"]
        target, cands = target_and_candidates(prompt)
        kind, val = self._next(target)
        if kind == "fault":
            if val == "429":
                return 429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}, \
                    {"Retry-After": self.retry_after}
            if val in ("500", "503"):
                return int(val), {"error": {"message": "The server had an error", "type": "server_error"}}, {}
            if val == "400":
                return 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}, {}
            if val == "slow":
                time.sleep(self.slow_s)
                return 200, self._completion(body, "too late"), {}
            if val == "badjson":
                return 200, None, {}
            raise AssertionError(f"unknown fault {val!r}")
        text = val if val is not None else self.default(target, cands)
        return 200, self._completion(body, text), {}

    @staticmethod
    def _completion(body: dict, text: str) -> dict:
        p = sum(len(m["content"].split()) for m in body["messages"])
        c = len(text.split())
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "stub"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                             "logprobs": None}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        path = h.path.split("?")[0]
        rec = {"method": method, "path": path, "target": None, "authorization": h.headers.get("Authorization"),
               "time": time.time()}
        try:
            if method == "POST" and path == "/v1/chat/completions":
                body = json.loads(raw)
                prompt = body["messages"][-1]["content"]
                rec["target"], rec["candidates"] = target_and_candidates(prompt)
                rec["prompt"], rec["top_p"], rec["model"] = prompt, body.get("top_p"), body.get("model")
                with self._lock:
                    self.log.append(rec)
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    time.sleep(self.delay)
                    status, out, headers = self._chat_body(body)
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if out is None:
                    return self._send(h, 200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess', {})
                return self._send(h, status, json.dumps(out).encode(), headers)
            with self._lock:
                self.log.append(rec)
            if method == "POST" and path == "/v1/files":
                fid = f"file-{uuid.uuid4().hex[:12]}"
                self.files[fid] = _multipart_file(h.headers.get("Content-Type", ""), raw)
                return self._json(h, {"id": fid, "object": "file", "bytes": len(self.files[fid]),
                                      "created_at": int(time.time()), "filename": "input.jsonl",
                                      "purpose": "batch", "status": "processed"})
            m = re.fullmatch(r"/v1/files/([\w-]+)/content", path)
            if method == "GET" and m:
                data = self.files.get(m.group(1))
                if data is None:
                    return self._json(h, {"error": {"message": "no such file"}}, 404)
                return self._send(h, 200, data, {"Content-Type": "application/octet-stream"})
            if method == "POST" and path == "/v1/batches":
                body = json.loads(raw)
                bid = f"batch_{uuid.uuid4().hex[:12]}"
                self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"],
                                     "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                                     "status": "validating", "created_at": int(time.time()), "polls": 0,
                                     "metadata": body.get("metadata")}
                return self._json(h, self._batch_view(bid))
            m = re.fullmatch(r"/v1/batches/([\w-]+)", path)
            if method == "GET" and m:
                bid = m.group(1)
                b = self.batches[bid]
                b["polls"] += 1
                if b["status"] == "validating":
                    b["status"] = "in_progress"
                elif b["status"] == "in_progress" and b["polls"] >= self.batch_polls:
                    self._run_batch(bid)
                return self._json(h, self._batch_view(bid))
            return self._json(h, {"error": {"message": f"no route {method} {path}"}}, 404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def _batch_view(self, bid: str) -> dict:
        return {k: v for k, v in self.batches[bid].items() if k != "polls"}

    def _run_batch(self, bid: str) -> None:
        b = self.batches[bid]
        out_lines, err_lines = [], []
        for line in self.files[b["input_file_id"]].decode().splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            target, cands = target_and_candidates(req["body"]["messages"][-1]["content"])
            with self._lock:
                self.log.append({"method": "BATCH", "path": "batch-line", "target": target, "candidates": cands,
                                 "custom_id": req["custom_id"], "top_p": req["body"].get("top_p"), "time": time.time()})
            status, body, _ = self._chat_body(req["body"])
            row = {"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": req["custom_id"],
                   "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}
            (out_lines if status == 200 and body is not None else err_lines).append(json.dumps(row))
        for lines, key in ((out_lines, "output_file_id"), (err_lines, "error_file_id")):
            if lines:
                fid = f"file-{uuid.uuid4().hex[:12]}"
                self.files[fid] = ("\n".join(lines) + "\n").encode()
                b[key] = fid
        b["status"] = "completed"
        b["completed_at"] = int(time.time())
        b["request_counts"] = {"total": len(out_lines) + len(err_lines), "completed": len(out_lines),
                               "failed": len(err_lines)}

    def _json(self, h, obj, status: int = 200) -> None:
        self._send(h, status, json.dumps(obj).encode(), {})

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict) -> None:
        h.send_response(status)
        h.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


def _multipart_file(content_type: str, raw: bytes) -> bytes:
    """The bytes of the part named "file" of a multipart/form-data body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise AssertionError(f"not multipart: {content_type!r}")
    for part in raw.split(b"--" + m.group(1).encode()):
        head, _, body = part.partition(b"\r\n\r\n")
        if b'name="file"' in head:
            return body[:-2] if body.endswith(b"\r\n") else body
    raise AssertionError("no file part in the upload")
