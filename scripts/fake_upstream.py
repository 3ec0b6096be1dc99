#!/usr/bin/env python3
"""A deterministic fake OpenAI- and Anthropic-compatible upstream for scripts/sdk_check.sh.

Serves POST /v1/chat/completions, /v1/responses and /v1/messages, JSON or SSE (`"stream": true`),
and POST /v1/embeddings,
with fixed ids and timestamps so that responses are byte-identical from call to call.
Listens on 127.0.0.1 on the port given as argv[1] (0: any) and prints `port N` when ready.
Standard library only.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHAT = {
    "id": "chatcmpl-fake1", "object": "chat.completion", "created": 1730000000, "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake upstream",
                                         "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160,
              "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 16, "audio_tokens": 0}},
    "system_fingerprint": "fp_fake",
}


def chat_chunks(include_usage):
    base = {"id": "chatcmpl-fake2", "object": "chat.completion.chunk", "created": 1730000000,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_fake"}
    deltas = [{"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": " world"}]
    for i, delta in enumerate(deltas):
        chunk = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        if include_usage:
            chunk["usage"] = None
        yield "data: " + json.dumps(chunk) + "\n\n"
    chunk = dict(base, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
    if include_usage:
        chunk["usage"] = None
    yield "data: " + json.dumps(chunk) + "\n\n"
    if include_usage:
        usage = {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        yield "data: " + json.dumps(dict(base, choices=[], usage=usage)) + "\n\n"
    yield "data: [DONE]\n\n"


MESSAGE = {
    "id": "msg_fake1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hello from the fake upstream"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 20, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 4000,
              "output_tokens": 90},
}


def message_events():
    def ev(name, data):
        return "event: " + name + "\ndata: " + json.dumps(data) + "\n\n"
    start = dict(MESSAGE, id="msg_fake2", content=[], stop_reason=None,
                 usage={"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100,
                        "output_tokens": 1})
    yield ev("message_start", {"type": "message_start", "message": start})
    yield ev("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}})
    yield ev("ping", {"type": "ping"})
    for text in ["Hello", " world"]:
        yield ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}})
    yield ev("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 12}})
    yield ev("message_stop", {"type": "message_stop"})


RESPONSE = {
    "id": "resp_fake1", "object": "response", "created_at": 1730000000, "status": "completed",
    "model": "gpt-4.1-2025-04-14", "output": [{"type": "message", "id": "msg_fake3", "status": "completed",
                                               "role": "assistant", "content": [
                                                   {"type": "output_text", "text": "Hello", "annotations": []}]}],
    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
    "usage": {"input_tokens": 300, "input_tokens_details": {"cached_tokens": 128}, "output_tokens": 50,
              "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 350},
}

EMBEDDINGS = {
    "object": "list", "model": "text-embedding-3-small",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0091, 0.0152]}],
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def response_events():
    def ev(data):
        return "event: " + data["type"] + "\ndata: " + json.dumps(data) + "\n\n"
    created = dict(RESPONSE, id="resp_fake2", status="in_progress", output=[], usage=None)
    yield ev({"type": "response.created", "sequence_number": 0, "response": created})
    yield ev({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_fake3",
              "output_index": 0, "content_index": 0, "delta": "Hello", "logprobs": []})
    done = dict(RESPONSE, id="resp_fake2")
    yield ev({"type": "response.completed", "sequence_number": 2, "response": done})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("upstream: " + (fmt % args) + "\n")

    def send_json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-request-id", "req_fake")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_sse(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-request-id", "req_fake")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            data = event.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            req = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            req = {}
        path = self.path.split("?")[0]
        stream = req.get("stream") is True
        if path.endswith("/chat/completions"):
            if stream:
                include = bool((req.get("stream_options") or {}).get("include_usage"))
                self.send_sse(chat_chunks(include))
            else:
                self.send_json(CHAT)
        elif path.endswith("/messages"):
            self.send_sse(message_events()) if stream else self.send_json(MESSAGE)
        elif path.endswith("/responses"):
            self.send_sse(response_events()) if stream else self.send_json(RESPONSE)
        elif path.endswith("/embeddings"):
            self.send_json(EMBEDDINGS)
        else:
            body = json.dumps({"error": {"message": "not found", "type": "invalid_request_error",
                                         "code": None}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0), Handler)
    print("port", server.server_address[1], flush=True)
    server.serve_forever()
