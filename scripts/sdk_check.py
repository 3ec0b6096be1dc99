#!/usr/bin/env python3
"""Calls the upstream directly and through the gateway with the official `openai` and
`anthropic` SDKs, non-streaming and streaming, and checks that both see the same thing.

Usage: sdk_check.py DIRECT_BASE GATEWAY_BASE   (e.g. http://127.0.0.1:9001 http://127.0.0.1:8080)
"""
import json
import sys

import anthropic
import openai

direct, gateway = sys.argv[1], sys.argv[2]
failures = 0


def openai_client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)


def anthropic_client(base):
    return anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0,
                               default_headers={"x-customer": "customer-anthropic"})


def openai_json(base):
    raw = openai_client(base).chat.completions.with_raw_response.create(
        model="gpt-4o", user="customer-openai", messages=[{"role": "user", "content": "hi"}])
    return raw.http_response.content, raw.parse().model_dump_json()


def openai_stream(base):
    stream = openai_client(base).chat.completions.create(
        model="gpt-4o", user="customer-openai", messages=[{"role": "user", "content": "hi"}],
        stream=True, stream_options={"include_usage": True})
    return [chunk.model_dump_json() for chunk in stream]


def openai_stream_no_usage(base):
    # Billed only with METERING_ENSURE_STREAM_USAGE=1 (else one zero-token `missing` event);
    # the client must see no difference.
    stream = openai_client(base).chat.completions.create(
        model="gpt-4o", user="customer-openai-no-usage", messages=[{"role": "user", "content": "hi"}],
        stream=True)
    return [chunk.model_dump_json() for chunk in stream]


def openai_responses(base):
    raw = openai_client(base).responses.with_raw_response.create(
        model="gpt-4.1", user="customer-openai", input="hi")
    return raw.http_response.content, raw.parse().model_dump_json()


def openai_responses_stream(base):
    stream = openai_client(base).responses.create(model="gpt-4.1", user="customer-openai", input="hi", stream=True)
    return [event.model_dump_json() for event in stream]


def openai_embeddings(base):
    raw = openai_client(base).embeddings.with_raw_response.create(
        model="text-embedding-3-small", user="customer-openai", input="billing")
    return raw.http_response.content, raw.parse().model_dump_json()


def anthropic_json(base):
    raw = anthropic_client(base).messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    return raw.http_response.content, raw.parse().model_dump_json()


def anthropic_stream(base):
    with anthropic_client(base).messages.stream(
            model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
        events = [event.model_dump_json() for event in stream]
        final = stream.get_final_message().model_dump_json()
    return events, final


for name, call in [("openai chat.completions", openai_json), ("openai chat.completions stream", openai_stream),
                   ("openai stream, no include_usage", openai_stream_no_usage),
                   ("openai responses", openai_responses), ("openai responses stream", openai_responses_stream),
                   ("openai embeddings", openai_embeddings),
                   ("anthropic messages", anthropic_json), ("anthropic messages stream", anthropic_stream)]:
    a, b = call(direct), call(gateway)
    same = a == b
    failures += not same
    detail = ""
    if name == "openai stream, no include_usage":
        detail = " (%d chunks, last usage %s)" % (len(b), json.loads(b[-1]).get("usage"))
    elif name == "openai chat.completions stream":
        detail = " (%d chunks, last usage %s)" % (len(b), json.loads(b[-1])["usage"])
    elif name == "openai responses stream":
        detail = " (%d events, final usage %s)" % (len(b), json.loads(b[-1])["response"]["usage"])
    elif name == "anthropic messages stream":
        detail = " (%d events, final usage %s)" % (len(b[0]), json.loads(b[1])["usage"])
    else:
        detail = " (%d raw bytes, usage %s)" % (len(b[0]), json.loads(b[1])["usage"])
    print("%-34s %s%s" % (name, "identical" if same else "DIFFERENT", detail))

print("openai %s, anthropic %s" % (openai.__version__, anthropic.__version__))
sys.exit(1 if failures else 0)
