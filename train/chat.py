"""`llm-scratch chat`: talk to a model, with its reasoning shown apart from its answer.

llm-scratch chat --checkpoint DIR                    interactive, history kept (/reset, /exit)
llm-scratch chat --checkpoint DIR --prompt "What is 12 + 30?" --temperature 0
llm-scratch chat --checkpoint DIR --no-think ...     the template's empty think block: answer directly
"""

from __future__ import annotations

import sys

import torch

from models import load_pretrained
from models.chat_format import IMAGE, PAD, STOP_TOKENS
from models.generate import generate
from models.think import ThinkParser

from .data.chat_masks import encode_prompt
from .data.images import image_inputs
from .data.tokenizer import check_vocab, load_tokenizer, tokenizer_dir_for
from .errors import UserError

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"


class TextStream:
    """Incremental detokenization: the text each new token adds (held back while a UTF-8 character
    is still incomplete). Each call decodes only the tokens since the last complete character and the
    ones before them, so a long reply costs linear, not quadratic, time."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self.start, self.read = 0, 0  # ids[start:read] were emitted; ids[read:] not yet

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.start : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.start :], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        new = after[len(before) :]
        self.start, self.read = self.read, len(self.ids)
        self.text += new
        return new


class Display:
    """Prints reasoning dimmed under a 'thinking' heading and the answer apart (plain text off a tty)."""

    def __init__(self, out=sys.stdout):
        self.out, self.kind = out, None
        self.color = hasattr(out, "isatty") and out.isatty()

    def piece(self, kind: str, text: str) -> None:
        if kind != self.kind:
            if self.kind is not None:
                self.out.write(RESET if self.color else "")
                self.out.write("\n\n")
            heading = "thinking" if kind == "reasoning" else "answer"
            self.out.write(f"{BOLD}{heading}{RESET}\n" if self.color else f"[{heading}]\n")
            if kind == "reasoning" and self.color:
                self.out.write(DIM)
            self.kind = kind
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write((RESET if self.color else "") + "\n")
        self.out.flush()


class ChatSession:
    """A conversation with a model. With `image` (a VLM) the first user turn of the conversation (again
    after /reset) shows the image: its text gets the <|image|> placeholder in front."""

    def __init__(self, checkpoint, think: bool = True, system: str | None = None, image: str | None = None, **sampling):
        self.model = load_pretrained(checkpoint).eval()
        self.image_tokens, loader = image_inputs(self.model)
        if image is not None and loader is None:
            raise UserError(f"--image: {checkpoint} is a {self.model.config.model_type} model, not a VLM")
        self.pixel_values = loader([image]) if image is not None else None
        self.tokenizer = load_tokenizer(tokenizer_dir_for(checkpoint))
        check_vocab(self.tokenizer, self.model, checkpoint)
        self.seed = sampling.pop("seed", 0)
        self.think, self.sampling = think, sampling
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.dropped_turns = 0
        self.stop = [self.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        self.pad = self.tokenizer.convert_tokens_to_ids(PAD)

    def reply(self, user_text: str, display: Display | None = None) -> tuple[str, str]:
        """(reasoning, answer) for the next user turn; the turn and the reply join the history."""
        first_user = not any(m["role"] == "user" for m in self.messages)
        if self.pixel_values is not None and first_user:
            user_text = f"{IMAGE}\n{user_text}"
        self.messages.append({"role": "user", "content": user_text})
        ids = self._fit_context()
        parser, stream = ThinkParser(), TextStream(self.tokenizer)

        def on_token(_i: int, tok: int) -> None:
            if tok in self.stop:
                return
            for kind, text in parser.feed(stream.add(tok)):
                if display:
                    display.piece(kind, text)

        generate(
            self.model,
            [ids],
            stop_ids=self.stop,
            pad_id=self.pad,
            on_token=on_token,
            generator=torch.Generator().manual_seed(self.seed),
            pixel_values=self.pixel_values,
            **self.sampling,
        )
        for kind, text in parser.finish():
            if display:
                display.piece(kind, text)
        if display:
            display.end()
        self.messages.append({"role": "assistant", "content": parser.answer, "reasoning_content": parser.reasoning})
        return parser.reasoning, parser.answer

    def _fit_context(self) -> list[int]:
        """The prompt's ids; while they leave no room in the model's context, the oldest exchange (a user
        turn and its reply) is dropped, and the display says so. (A VLM's image moves to the new first user
        turn.) A message that alone does not fit is an error, and leaves the history as it was."""
        limit = self.model.config.max_position_embeddings
        alone = [m for m in self.messages if m["role"] == "system"] + self.messages[-1:]
        n = len(encode_prompt(self.tokenizer, alone, self.think, self.image_tokens))
        if n >= limit:
            self.messages.pop()
            raise UserError(f"the message is {n} tokens with the template; the model's context is {limit}")
        while True:
            ids = encode_prompt(self.tokenizer, self.messages, self.think, self.image_tokens)
            if len(ids) < limit:
                return ids
            first = next(i for i, m in enumerate(self.messages) if m["role"] != "system")
            dropped = self.messages.pop(first)
            while first < len(self.messages) - 1 and self.messages[first]["role"] == "assistant":
                self.messages.pop(first)
            self.dropped_turns += 1
            if IMAGE in dropped["content"]:
                self.messages[first]["content"] = f"{IMAGE}\n" + self.messages[first]["content"]
            print(f"(the conversation outgrew the model's context of {limit} tokens: dropped its oldest turn)")

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]


def run_chat(ns) -> None:
    session = ChatSession(
        ns.checkpoint,
        think=ns.think,
        system=ns.system,
        image=ns.image,
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        top_k=ns.top_k,
        top_p=ns.top_p,
        repetition_penalty=ns.repetition_penalty,
        seed=ns.seed,
    )
    display = Display()
    if ns.prompt is not None:
        session.reply(ns.prompt, display)
        return
    print("chat: type a message; /reset clears the history, /exit (or Ctrl-D) leaves.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            print("(history cleared)")
            continue
        if line:
            try:
                session.reply(line, display)
            except UserError as e:  # the conversation goes on
                print(f"error: {e}")
