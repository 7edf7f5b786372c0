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
from contextlib import contextmanager

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


@contextmanager
def _serving(checkpoint, model_id: str, api_key: str | None = "secret", slots: int = 8):
    """`llm-scratch serve`'s app on a free port, in a thread of this process."""
    import uvicorn

    from train.serve.app import create_app, served_model

    served = served_model(checkpoint, slots=slots, model_id=model_id)
    srv = uvicorn.Server(uvicorn.Config(create_app(served, api_key), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield {"url": f"http://127.0.0.1:{port}", "served": served, "checkpoint": checkpoint}
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        served.engine.stop()


@pytest.fixture(scope="module")
def server(sft_model_dir):
    with _serving(sft_model_dir, "micro") as s:
        yield s


@pytest.fixture(scope="module")
def scripted(scripted_checkpoint):
    """A server whose model always thinks and answers the same (conftest.py's scripted_checkpoint)."""
    d, reasoning, answer = scripted_checkpoint
    with _serving(d, "scripted") as s:
        s["expected"] = (reasoning, answer)
        yield s


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
    # The stop string is cut from text the model writes when sampled with a seed (the same seed writes the
    # same text again); greedy decoding of the barely trained micro model can be all blanks.
    kwargs = dict(model="micro", messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=1.0, max_tokens=40)
    texts = {}
    for seed in range(5):
        m = client.chat.completions.create(seed=seed, **kwargs).choices[0].message
        texts[seed] = m.content or m.reasoning_content or ""
        if len(texts[seed]) >= 4:
            break
    else:
        raise AssertionError(f"the micro model wrote under 4 characters with every seed: {texts}")
    stop = texts[seed][2:4]
    cut = client.chat.completions.create(seed=seed, stop=[stop], **kwargs)
    c = cut.choices[0]
    assert c.finish_reason == "stop"
    assert stop not in (c.message.content or "") and stop not in (c.message.reasoning_content or "")
    kwargs = {**kwargs, "max_tokens": 24}
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
            r = client.chat.completions.create(model="micro", messages=msg, max_tokens=4, temperature=0)
            return "ok" if r.choices[0].finish_reason in ("stop", "length") else "bad-finish"
        except openai.BadRequestError:
            return "refused" if i % 4 == 3 else "wrongly-refused"

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(300)))
    assert results.count("ok") == 225 and results.count("refused") == 75, set(results)
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert not server["served"].engine.decoder.active


def test_serve_options_are_checked_before_loading(cli_error, tmp_path):
    cli_error(["serve", "--checkpoint", str(tmp_path), "--slots", "0"], "--slots must be at least 1")
    cli_error(["serve", "--checkpoint", str(tmp_path), "--port", "70000"], "--port must be in 0..65535")
    cli_error(["serve", "--checkpoint", str(tmp_path / "missing")], "missing")


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    from pathlib import Path

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing} not installed: `make test` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,850"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_web_page_streams_the_answer_and_folds_the_reasoning_in_a_real_browser(scripted, browser):
    from pathlib import Path

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    server = scripted
    browser.get(server["url"] + "/")
    browser.find_element(By.ID, "api-key").send_keys("secret", Keys.TAB)  # the server asks for a key
    wait.until(lambda d: d.find_element(By.ID, "model").text == "scripted")
    assert not browser.find_element(By.ID, "image-label").is_displayed()  # a text model: no image upload
    for field, value in (("temperature", "0"), ("max-tokens", "48")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)

    def ask(question: str, turn: int):
        browser.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]")) == turn)
        reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[turn - 1]
        assert reply.get_attribute("data-finish") in ("stop", "length")
        reasoning = reply.find_element(By.CSS_SELECTOR, "details.reasoning .text").get_attribute("textContent")
        return reply, reasoning, reply.find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent")

    reply, reasoning, answer = ask(QUESTIONS[0], 1)
    assert (reasoning, answer) == server["expected"]
    assert (reasoning, answer) == _chat_reference(server["checkpoint"], QUESTIONS[0], max_new_tokens=48)
    details = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert details.is_displayed() and details.get_attribute("open") is None  # folded, apart from the answer
    assert reply.find_element(By.CSS_SELECTOR, ".answer").text == server["expected"][1]
    details.find_element(By.TAG_NAME, "summary").click()
    assert details.get_attribute("open") is not None
    _, _, second = ask(QUESTIONS[1], 2)  # the conversation goes on with its history
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2 and isinstance(second, str)
    shot = Path(__file__).resolve().parents[1] / ".cache" / "test-artifacts" / "web-chat.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))


def test_reasoning_comes_apart_streamed_and_not(scripted):
    client = openai.OpenAI(base_url=scripted["url"] + "/v1", api_key="secret", max_retries=0)
    reasoning, answer = scripted["expected"]
    msg = [{"role": "user", "content": "What is 40 + 2?"}]
    r = client.chat.completions.create(model="scripted", messages=msg, temperature=0)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (reasoning, answer)
    assert r.choices[0].finish_reason == "stop"
    kinds, got = [], {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(model="scripted", messages=msg, temperature=0, stream=True):
        for c in chunk.choices:
            for key in got:
                piece = getattr(c.delta, key, None)
                if piece:
                    got[key] += piece
                    kinds.append(key)
    assert got == {"reasoning_content": reasoning, "content": answer}
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # every reasoning delta before the answer's
    assert kinds.count("reasoning_content") > 1  # streamed token by token, not sent at the end


def test_the_vlm_answers_about_an_image_sent_as_a_data_uri(tmp_path, tokenizer_dir, tokenizer):
    from PIL import Image

    from models import save_model
    from train.chat import ChatSession

    text = make_config("dense", "micro", vocab_size=len(tokenizer)).to_dict()
    torch.manual_seed(0)
    vlm = VLM(
        VLMConfig(text_config=text, vision_num_layers=1, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"))
    )
    save_model(vlm, tmp_path / "vlm", tokenizer_dir)
    image = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(image)
    session = ChatSession(tmp_path / "vlm", image=str(image), temperature=0.0, max_new_tokens=12)
    expected = session.reply("What colour is it?")
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    with _serving(tmp_path / "vlm", "vlm", api_key=None) as s:
        client = openai.OpenAI(base_url=s["url"] + "/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].vision is True
        parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What colour is it?"}]
        r = client.chat.completions.create(
            model="vlm", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=12
        )
        assert ((r.choices[0].message.reasoning_content or ""), r.choices[0].message.content) == expected
        bad = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]
        with pytest.raises(openai.BadRequestError, match="cannot read the image"):
            client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": bad}])
        remote = [{"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}}]
        with pytest.raises(openai.BadRequestError, match="data URI"):
            client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": remote}])
