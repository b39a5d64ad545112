"""A small HTTP endpoint that batches generation requests (assignment 14 serves the tiny model with it).

    POST /generate  {"prompt": str, "max_new_tokens": int}  ->  {"text": str, "batch_size": int}

Standard library only. `ThreadingHTTPServer` answers each connection on its own thread; a
`queue.Queue` hands the parsed requests to the one thread that runs the model. That thread waits
up to `max_wait_s` for more requests, groups them with `batch_rule(prompt_lengths, max_batch)`
(the learner's `form_batches`: equal prompt lengths only, since `generate` has no padding) and
runs `generate` once per batch.

Every request gets an answer, a JSON `{"error": ...}` that says what is wrong when it cannot be
served, and no client can hold a thread for long:
  400  the body is not a JSON object, `prompt` is not a non-empty valid Unicode string,
       `max_new_tokens` is not an integer in [0, max_new_tokens], the prompt plus the new tokens
       do not fit in the model's context, or the Content-Length header is not a number
  404  a path other than /generate        411  no Content-Length (the body length must be known)
  408  the whole body did not arrive within read_timeout_s (a client that announces more than it
       sends, or sends it a byte at a time)
  413  the body is larger than max_body_bytes (refused before reading it)
  500  generation failed                  503  no answer from the model within answer_timeout_s
"""

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class RequestError(Exception):
    """A request that cannot be served: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, tokenizer, max_new_tokens: int, context_length: int) -> tuple[list, int]:
    """(prompt token ids, new tokens wanted) from a request body, or RequestError(400)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or nested too deep
        raise RequestError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(request, dict):
        raise RequestError(400, f'the body must be a JSON object like {{"prompt": "..."}}, got {type(request).__name__}')
    prompt, new = request.get("prompt"), request.get("max_new_tokens", min(16, max_new_tokens))
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string")
    if isinstance(new, bool) or not isinstance(new, int) or not 0 <= new <= max_new_tokens:
        raise RequestError(400, f"'max_new_tokens' must be an integer in [0, {max_new_tokens}], got {new!r}")
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as err:  # e.g. a lone surrogate ("\ud800"), which has no UTF-8 form
        raise RequestError(400, f"'prompt' is not valid text: {err}") from None
    if len(ids) + new > context_length:
        raise RequestError(400, f"the prompt is {len(ids)} tokens and asks for {new} more, but the model's context "
                                f"holds {context_length} tokens: shorten the prompt or ask for fewer tokens")
    return ids, new


class BatchingServer:
    """Serve `model.generate` on http://127.0.0.1:<free port>/generate until `close()`."""

    def __init__(self, model, tokenizer, batch_rule, max_batch: int, max_wait_s: float = 0.01,
                 max_new_tokens: int = 256, max_body_bytes: int = 64 * 1024, read_timeout_s: float = 10.0,
                 answer_timeout_s: float = 300.0, context_length: int | None = None):
        batch_rule([1], 1)  # fails here, at once, if the batching rule is missing
        self.model, self.tokenizer, self.batch_rule = model, tokenizer, batch_rule
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.context_length = context_length or model.config.max_position_embeddings
        self.requests = queue.Queue()
        self.batch_sizes = []  # one entry per generate call: how many requests it served
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = read_timeout_s  # socket timeout: a body that stops arriving frees the thread

            def do_POST(self):
                try:
                    if self.path != "/generate":
                        raise RequestError(404, f"unknown path {self.path}: POST to /generate")
                    ids, new = parse_request(self._body(), server.tokenizer, max_new_tokens, server.context_length)
                except RequestError as err:
                    return self._reply(err.status, {"error": str(err)})
                job = {"ids": ids, "new": new, "done": threading.Event()}
                server.requests.put(job)
                if not job["done"].wait(answer_timeout_s):
                    return self._reply(503, {"error": f"the model did not answer within {answer_timeout_s:g} s"})
                self._reply(500 if "error" in job else 200, {k: job[k] for k in ("text", "batch_size", "error") if k in job})

            def _body(self) -> bytes:
                length = self.headers.get("Content-Length")
                if length is None:
                    raise RequestError(411, "send a Content-Length header with the JSON body")
                if not length.strip().isdigit():
                    raise RequestError(400, f"Content-Length must be a number of bytes, got {length!r}")
                if int(length) > max_body_bytes:
                    self.close_connection = True  # the unread body must not be parsed as a next request
                    raise RequestError(413, f"the body is {int(length)} bytes; the limit is {max_body_bytes}")
                body, deadline = b"", time.monotonic() + read_timeout_s  # for the whole body, not per packet
                try:
                    while len(body) < int(length) and time.monotonic() < deadline:
                        self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                        chunk = self.rfile.read1(int(length) - len(body))
                        if not chunk:  # the client closed its side
                            break
                        body += chunk
                except TimeoutError:
                    pass
                if len(body) < int(length):
                    self.close_connection = True
                    raise RequestError(408, f"the body did not arrive: Content-Length says {int(length)} bytes, "
                                            f"{len(body)} came within {read_timeout_s:g} s")
                return body

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client went away: nobody is left to answer
                    self.close_connection = True

            def log_message(self, *args):  # keep the notebook quiet: no access log on stderr
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: any free port
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/generate"
        self.running = True
        self.threads = [threading.Thread(target=self.httpd.serve_forever, daemon=True),
                        threading.Thread(target=self._model_loop, daemon=True)]
        for t in self.threads:
            t.start()

    def _model_loop(self):
        while self.running:
            try:
                pending = [self.requests.get(timeout=0.05)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.max_wait_s
            while len(pending) < 4 * self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    pending.append(self.requests.get(timeout=left))
                except queue.Empty:
                    break
            try:
                batches = [[pending[i] for i in batch] for batch in
                           self.batch_rule([len(job["ids"]) for job in pending], self.max_batch)]
            except Exception as err:  # a broken batching rule must not hang the clients
                batches = []
                for job in pending:
                    job["error"] = f"the batching rule failed: {err!r}"
            for jobs in batches:
                if jobs:
                    self._run(jobs)
            for job in pending:
                if "text" not in job and "error" not in job:  # a batching rule that forgot a request
                    job["error"] = "the batching rule left this request out of every batch"
                job["done"].set()

    @torch.no_grad()
    def _run(self, jobs):
        try:
            device = next(self.model.parameters()).device
            ids = torch.tensor([job["ids"] for job in jobs], device=device)
            out = self.model.generate(ids, max_new_tokens=max(job["new"] for job in jobs)).cpu()
            self.batch_sizes.append(len(jobs))
            for job, row in zip(jobs, out):
                job["text"] = self.tokenizer.decode(row[len(job["ids"]):len(job["ids"]) + job["new"]].tolist())
                job["batch_size"] = len(jobs)
        except Exception as err:
            for job in jobs:
                job["error"] = f"generation failed: {err!r}"

    def close(self):
        self.running = False
        self.httpd.shutdown()
        self.httpd.server_close()


def post(url, payload, timeout=60):
    """(status, JSON answer) of a POST with a JSON body."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
