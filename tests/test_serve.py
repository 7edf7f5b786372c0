"""Serving: continuous batching against one-at-a-time generation (dense, MoE, VLM), and the
OpenAI-compatible server driven by the official `openai` client: chat (streamed and not, reasoning on
and off) equal to `llm-scratch chat --temperature 0`, completions, concurrent requests batched, stop
strings, seeds, disconnects, and bad requests answered with OpenAI errors while the server stays up."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from models import VLM, DenseLM, MoELM, VLMConfig, make_config
from models.batching import BatchDecoder, Request
from models.generate import generate


def _prompts(vocab: int, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_continuous_batching_equals_one_at_a_time(kind):
    torch.manual_seed(0)
    model = (DenseLM if kind == "dense" else MoELM)(make_config(kind, "micro", vocab_size=97)).eval()
    prompts = _prompts(97, (3, 17, 5, 30, 1, 9, 12))
    budgets = [20, 5, 33, 8, 14, 3, 25]
    solo = [generate(model, [p], k)[0] for p, k in zip(prompts, budgets)]
    decoder = BatchDecoder(model, slots=3)  # fewer slots than requests: they join as others leave
    requests = [Request(p, k) for p, k in zip(prompts, budgets)]
    widths, sizes = [], []
    step = decoder.step

    def watched_step():
        sizes.append(len(decoder.active))
        step()
        widths.append(decoder.length)

    decoder.step = watched_step
    decoder.run(requests)
    assert [r.tokens for r in requests] == solo
    assert all(r.finish_reason == "length" for r in requests)
    assert max(sizes) == 3 and min(sizes) >= 1
    # the shared time axis never grows past the longest sequence alive: finished spans are dropped
    assert max(widths) <= max(len(p) + k for p, k in zip(prompts, budgets))
    assert decoder.length == 0 and not decoder.active


def test_stop_tokens_sampling_and_cancel_in_a_batch():
    torch.manual_seed(0)
    model = DenseLM(make_config("dense", "micro", vocab_size=64)).eval()
    prompts = _prompts(64, (4, 6, 9))
    free = [generate(model, [p], 12)[0] for p in prompts]
    stop = free[1][4]
    requests = [Request(p, 12, stop_ids=[stop]) for p in prompts]
    BatchDecoder(model, slots=4).run(requests)
    for r, f in zip(requests, free):
        cut = next((i for i, t in enumerate(f) if t == stop), None)
        assert r.tokens == (f if cut is None else f[: cut + 1])
        assert r.finish_reason == ("length" if cut is None else "stop")
    # sampled: the same generator seed gives the sequence generate() samples, whatever else is batched
    sampled = generate(model, [prompts[0]], 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    mixed = [
        Request(prompts[0], 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5)),
        Request(prompts[2], 10),
    ]
    BatchDecoder(model, slots=2).run(mixed)
    assert mixed[0].tokens == sampled[0]
    # cancelled while running: it leaves at the next step and the others go on unchanged
    decoder = BatchDecoder(model, slots=2)
    a, b = Request(prompts[0], 12), Request(prompts[2], 12)
    decoder.add(a)
    decoder.add(b)
    decoder.step()
    a.cancelled = True
    while decoder.active:
        decoder.step()
    assert a.finish_reason == "cancelled" and len(a.tokens) == 2
    assert b.tokens == free[2]


def test_continuous_batching_with_images():
    torch.manual_seed(0)
    text = make_config("dense", "micro", vocab_size=97).to_dict()
    model = VLM(VLMConfig(text_config=text, vision_num_layers=1, image_token_id=96)).eval()
    c = model.config
    prompts = [[1, 7] + [96] * c.image_tokens + [9, 10], [3] + [96] * c.image_tokens + [4, 5, 6, 8]]
    pixels = [torch.randn(1, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    solo = [generate(model, [p], 6, pixel_values=x)[0] for p, x in zip(prompts, pixels)]
    requests = [Request(p, 6, pixel_values=x) for p, x in zip(prompts, pixels)]
    BatchDecoder(model, slots=2).run(requests)
    assert [r.tokens for r in requests] == solo


def test_incremental_detokenization_is_exact_and_linear(tokenizer):
    from train.chat import TextStream

    class Counting:
        decoded = 0

        def decode(self, ids, **kw):
            Counting.decoded += len(ids)
            return tokenizer.decode(ids, **kw)

    text = "Café au lait (cafe\u0301), 東京タワー, emoji 🎉🧪 and <think> tags </think> " * 6
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    stream = TextStream(Counting())
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert Counting.decoded <= 6 * len(ids)  # each token decoded a bounded number of times, not the whole reply


# ---------------------------------------------------------------------------------------------- the server

openai = pytest.importorskip("openai")  # a dev dependency: installed by `make test`


@pytest.fixture(scope="module")
def server(sft_model_dir):
    import uvicorn

    from train.serve.app import create_app, served_model

    served = served_model(sft_model_dir, slots=8, model_id="micro")
    app = create_app(served, api_key="secret")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield {"url": f"http://127.0.0.1:{port}", "served": served, "checkpoint": sft_model_dir}
    srv.should_exit = True
    thread.join(timeout=10)
    served.engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="secret", max_retries=0, timeout=120)


QUESTIONS = ["What is 12 + 30?", "What is 7 - 3?", "Tell me a story.", "What is 105 + 9?"]


def _chat_reference(checkpoint, question, think=True, max_new_tokens=48):
    from train.chat import ChatSession

    session = ChatSession(checkpoint, think=think, temperature=0.0, max_new_tokens=max_new_tokens)
    return session.reply(question)


@pytest.mark.parametrize("think", [True, False])
def test_chat_greedy_equals_llm_scratch_chat(server, client, think):
    reasoning, answer = _chat_reference(server["checkpoint"], QUESTIONS[0], think)
    r = client.chat.completions.create(
        model="micro",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        temperature=0,
        max_tokens=48,
        extra_body={"chat_template_kwargs": {"enable_thinking": think}},
    )
    message = r.choices[0].message
    assert message.content == answer
    assert (message.reasoning_content or "") == reasoning
    if not think:
        assert message.reasoning_content is None
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(
        model="micro",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"enable_thinking": think}},
    )
    got, reasons, usage = {"content": "", "reasoning": ""}, [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            got["content"] += choice.delta.content or ""
            got["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert got == {"content": answer, "reasoning": reasoning}
    assert reasons == [r.choices[0].finish_reason] and usage.completion_tokens == r.usage.completion_tokens


def test_completions_and_models(server, client):
    tok = server["served"].tokenizer
    prompt = "Once upon a time"
    ids = tok.encode(prompt, add_special_tokens=False)
    served = server["served"]
    ours = generate(served.engine.model, [ids], 12, stop_ids=served.stop_ids, pad_id=served.engine.pad_id)[0]
    r = client.completions.create(model="micro", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == tok.decode([t for t in ours if t not in served.stop_ids], skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ours)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="micro", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert streamed == r.choices[0].text
    models = client.models.list()
    assert [m.id for m in models.data] == ["micro"]


def test_concurrent_requests_share_the_batch_and_match_solo_answers(server, client):
    solo = {q: _chat_reference(server["checkpoint"], q, max_new_tokens=32) for q in QUESTIONS}
    engine = server["served"].engine
    engine.peak_batch = 0

    def ask(q):
        r = client.chat.completions.create(
            model="micro", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=32
        )
        return q, (r.choices[0].message.reasoning_content or "", r.choices[0].message.content)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, QUESTIONS * 3))
    for q, got in answers:
        assert got == solo[q], q
    assert engine.peak_batch > 1  # requests joined a running batch


def test_stop_strings_seeds_and_n(server, client):
    base = client.chat.completions.create(
        model="micro", messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=0, max_tokens=40
    )
    full = (base.choices[0].message.reasoning_content or "") + "|" + base.choices[0].message.content
    text = base.choices[0].message.content or base.choices[0].message.reasoning_content
    assert len(text) >= 4, full
    stop = text[2:4]
    cut = client.chat.completions.create(
        model="micro", messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=0, max_tokens=40, stop=[stop]
    )
    c = cut.choices[0]
    assert c.finish_reason == "stop"
    assert stop not in (c.message.content or "") and stop not in (c.message.reasoning_content or "")
    kwargs = dict(model="micro", messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=1.0, max_tokens=24)
    a = client.chat.completions.create(seed=7, n=3, **kwargs)
    b = client.chat.completions.create(seed=7, n=3, **kwargs)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens >= 3  # all three choices counted


def test_a_client_that_goes_away_frees_its_slot(server):
    import httpx

    engine = server["served"].engine
    cancelled = engine.finished["cancelled"]
    body = {
        "model": "micro",
        "messages": [{"role": "user", "content": QUESTIONS[2]}],
        "temperature": 1.0,
        "ignore_eos": True,  # runs to the end of the context unless the client leaves
        "stream": True,
    }
    headers = {"Authorization": "Bearer secret"}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 5:  # the role chunk, then tokens: the request is running
                break
    deadline = time.time() + 20
    while engine.decoder.active and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.decoder.active
    assert engine.finished["cancelled"] == cancelled + 1, engine.finished


def _png_data_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client):
    import httpx

    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msg)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "9 " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="micro", messages=msg, max_tokens=10**6)
    assert "max_tokens" in e.value.body["message"]
    image = [{"type": "text", "text": "what colour?"}, {"type": "image_url", "image_url": {"url": _png_data_uri()}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="micro", messages=[{"role": "user", "content": image}])
    assert "text model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="micro", messages=msg, temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(
        server["url"] + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": "Bearer secret", "Content-Type": "application/json"},
    )
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(
        server["url"] + "/v1/chat/completions", json={"model": "micro"}, headers={"Authorization": "Bearer secret"}
    )
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]

    # a load of good and bad requests at once: every good one answered, the server healthy after
    def one(i):
        try:
            if i % 4 == 3:
                client.chat.completions.create(model="micro", messages=msg, max_tokens=10**6)
                return "answered-bad"
            r = client.chat.completions.create(model="micro", messages=msg, max_tokens=8, temperature=0)
            return "ok" if r.choices[0].finish_reason in ("stop", "length") else "bad-finish"
        except openai.BadRequestError:
            return "refused" if i % 4 == 3 else "wrongly-refused"

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(120)))
    assert results.count("ok") == 90 and results.count("refused") == 30, set(results)
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert not server["served"].engine.decoder.active


def test_serve_options_are_checked_before_loading(cli_error, tmp_path):
    cli_error(["serve", "--checkpoint", str(tmp_path), "--slots", "0"], "--slots must be at least 1")
    cli_error(["serve", "--checkpoint", str(tmp_path), "--port", "70000"], "--port must be in 0..65535")
    cli_error(["serve", "--checkpoint", str(tmp_path / "missing")], "missing")
