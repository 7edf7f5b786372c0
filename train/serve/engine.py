"""The serving engine: one thread owns the model and a BatchDecoder; requests from any thread join the
running batch at its next step and leave it when done. Request handlers meet it through `submit`, which
hands back an asyncio queue of ("token", id) and ("finish", reason) events."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter

from models.batching import BatchDecoder, Request

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, slots: int, pad_id: int):
        self.model, self.slots, self.pad_id = model, slots, pad_id
        self.decoder = BatchDecoder(model, slots, pad_id)
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="llm-scratch-engine", daemon=True)
        self.steps = 0
        self.peak_batch = 0
        self.finished: Counter[str] = Counter()  # requests ended, by reason
        self._outbox: dict = {}  # event loop -> [(queue, event)], filled by the engine thread only

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Queue `request`; its events arrive on the returned queue, in the caller's event loop. Events
        are gathered while the engine works and handed to each event loop once per step (one wake-up
        per step, not one per token and stream)."""
        events: asyncio.Queue = asyncio.Queue()

        def post(kind, value):
            self._outbox.setdefault(loop, []).append((events, (kind, value)))

        def finish(reason):
            self.finished[reason.split(":")[0]] += 1
            post("finish", reason)

        request.on_token = lambda token: post("token", token)
        request.on_finish = finish
        self.inbox.put(request)
        return events

    @staticmethod
    def _deliver(items) -> None:
        for events, item in items:
            events.put_nowait(item)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # that event loop has closed: nobody is listening
                pass

    def _admit(self, request: Request) -> None:
        if request.cancelled:
            request.finish_reason = "cancelled"
            request.on_finish("cancelled")
            return
        try:
            self.decoder.add(request)
        except Exception as e:  # the request's own fault (it was checked before): it alone ends
            log.exception("prefill failed")
            request.finish_reason = "error"
            request.on_finish(f"error: {e}")

    def _loop(self) -> None:
        while True:
            if not self.decoder.active:
                request = self.inbox.get()  # idle: wait for work
                if request is None:
                    return
                self._admit(request)
                self._flush()
            while self.decoder.free:
                try:
                    request = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    return
                self._admit(request)
                self._flush()
            self.peak_batch = max(self.peak_batch, len(self.decoder.active))
            try:
                self.decoder.step()
                self.steps += 1
            except Exception as e:  # every running sequence ends with the error; the server goes on
                log.exception("decode step failed")
                for request in list(self.decoder.active):
                    request.finish_reason = "error"
                    request.on_finish(f"error: {e}")
                self.decoder = BatchDecoder(self.model, self.slots, self.pad_id)
            self._flush()
