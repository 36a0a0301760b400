#!/usr/bin/env python3
"""pagellm's server against the official `openai` Python package (run by tests/server.rs, which starts
the server; by hand: `pagellm run MODEL --serve --port 8080`, then
`python3 tests/server_openai.py --base-url http://127.0.0.1:8080/v1`).

Checks: models.list, chat non-stream, chat stream (same text at temperature 0), completions, n=2,
stop sequences, seed reproducibility, logprobs, error classes, and a 5-turn conversation whose later
turns report usage.prompt_tokens_details.cached_tokens > 0. Ends with 'N passed, N failed'.
"""

import argparse
import sys
import traceback

import openai

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def chat(client, messages, **kw):
    return client.chat.completions.create(model="pagellm", messages=messages, **kw)


def user(text):
    return [{"role": "user", "content": text}]


@check
def models_list(client):
    ids = [m.id for m in client.models.list()]
    assert len(ids) == 1 and ids[0], ids


@check
def chat_non_stream(client):
    r = chat(client, user("What is the capital of France?"), max_tokens=24, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion", r.object
    assert c.message.role == "assistant" and c.message.content, c
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 24, r.usage


@check
def chat_stream_matches_non_stream(client):
    msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Describe the sea in one sentence."}]
    full = chat(client, msgs, max_tokens=32, temperature=0)
    parts, finish, usage = [], None, None
    for chunk in chat(client, msgs, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    assert "".join(parts) == full.choices[0].message.content, ("".join(parts), full.choices[0].message.content)
    assert finish == full.choices[0].finish_reason, (finish, full.choices[0].finish_reason)
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens, usage


@check
def completions(client):
    r = client.completions.create(model="pagellm", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion", r.object
    assert r.choices[0].text, r
    assert r.choices[0].finish_reason in ("stop", "length")
    parts = [c.choices[0].text for c in client.completions.create(model="pagellm", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)]
    assert "".join(parts) == r.choices[0].text, (parts, r.choices[0].text)


@check
def n_equals_2(client):
    r = chat(client, user("Tell me a short fact."), max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1], [c.index for c in r.choices]
    assert all(c.message.content for c in r.choices), r.choices
    total = sum(1 for _ in r.choices)
    assert total == 2
    s = list(client.completions.create(model="pagellm", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=3, n=2, stream=True))
    assert {c.choices[0].index for c in s if c.choices} == {0, 1}


@check
def stop_sequences(client):
    r = client.completions.create(model="pagellm", prompt="Count: 1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7", "\n\n"])
    t = r.choices[0].text
    assert "7" not in t and "5" in t, t
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    r = chat(client, user("List the numbers from 1 to 10, separated by commas."), max_tokens=40, temperature=0, stop="5")
    assert "5" not in r.choices[0].message.content, r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason


@check
def seed_reproducibility(client):
    def once(seed):
        return chat(client, user("Write a creative name for a cat."), max_tokens=16, temperature=1.0, top_p=1.0, seed=seed).choices[0].message.content

    a, b = once(1234), once(1234)
    assert a == b, (a, b)
    others = {once(s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "every seed gave the same text"


@check
def logprobs(client):
    r = chat(client, user("Hi"), max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2, t
        assert t.top_logprobs[0].token == t.token, t


@check
def errors(client):
    try:
        chat(client, user("hi"), temperature="hot")
        raise AssertionError("a string temperature was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "temperature" in str(e), e
    try:
        chat(client, user("hi " * 5000), max_tokens=4)
        raise AssertionError("a prompt longer than the context was accepted")
    except openai.BadRequestError as e:
        assert "context" in str(e), e
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="sk-wrong", max_retries=0)
    if ARGS.api_key:
        try:
            bad.models.list()
            raise AssertionError("a wrong API key was accepted")
        except openai.AuthenticationError:
            pass


@check
def five_turn_conversation_hits_the_cache(client):
    messages = [{"role": "system", "content": "You are a friendly assistant."}]
    cached = []
    for q in ["Hello!", "What is 3 + 4?", "Name a planet.", "What do bees make?", "Goodbye!"]:
        messages.append({"role": "user", "content": q})
        r = chat(client, messages, max_tokens=24, temperature=0)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        details = r.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details else 0)
        assert cached[-1] <= r.usage.prompt_tokens
    print(f"  cached_tokens per turn: {cached}")
    assert all(c > 0 for c in cached[1:]), cached


def main():
    client = openai.OpenAI(base_url=ARGS.base_url, api_key=ARGS.api_key or "none", max_retries=0, timeout=120)
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn(client)
            passed += 1
            print(f"ok: {fn.__name__}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAILED: {fn.__name__}")
            traceback.print_exc(file=sys.stdout)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="")
    ARGS = p.parse_args()
    sys.exit(main())
