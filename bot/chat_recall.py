"""A chat's long-term memory: its own older turns, beyond the prompt's window, recalled when they matter.

The prompt holds a chat's latest turns ([memory] max_turns); what someone told the bot a hundred messages
ago has left it. This searches the chat's earlier turns (kept in the same SQLite file, up to [memory]
recall_keep a chat) with the persona memory's search (finetune/recall_index.py) and gives the few that match
the conversation as dated notes, shown before the reply like the persona's own notes.

Memory never crosses chats: a chat's index is built from `ConversationMemory.earlier(chat_key, ...)`, which
reads that chat's rows alone, and is cached under that chat's key. What someone said in a DM never reaches a
group or another DM.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from finetune.prompt import ChatTurn, MemoryNote
from finetune.recall_index import RecallIndex, conversation_scores, relevant
from finetune.records import ChatRecord

CACHED_CHATS = 256  # chats whose index is kept between messages (the least recently used go first)
NEW_TURNS_READ = 64  # when a cached chat's window moved on: turns read first, in the hope they reach the cached ones
NOTE_CHARS = 200


@dataclass
class _ChatIndex:
    first: str | None  # message_id of the oldest turn indexed
    last: str | None  # and of the newest
    turns: list[ChatRecord]
    index: RecallIndex


class ChatRecall:
    """Recalls a chat's earlier turns. One per daemon; `notes` is called per reply, from worker threads (the router's
    asyncio.to_thread), so that indexing a chat never holds up the event loop. One chat is recalled by one thread at a
    time (the dispatcher answers a chat's messages in order); the cache they share is guarded by a lock."""

    def __init__(self, memory, keep: int, k: int):
        self.memory = memory  # bot.memory.ConversationMemory
        self.keep = keep  # earlier turns searched at most
        self.k = k
        self._cache: OrderedDict[str, _ChatIndex] = OrderedDict()
        self._lock = threading.Lock()  # held for the cache's bookkeeping only, never while indexing

    def notes(self, chat_key: str, window: Sequence[ChatRecord]) -> list[MemoryNote]:
        """Up to k notes from the chat's turns before `window` (its records from `recent`), oldest first."""
        if self.k <= 0 or not window:
            return []
        span = self.memory.earlier_span(chat_key, window[0].message_id, self.keep)
        if span is None:
            self.forget(chat_key)
            return []
        with self._lock:
            cached = self._cache.get(chat_key)
        if cached is None or (cached.first, cached.last) != span:
            # The window moved (in jumps: memory.window_start) or the chat was pruned or reset: index again.
            earlier = self._read(chat_key, window[0].message_id, span, cached)
            if not earlier:
                self.forget(chat_key)
                return []
            cached = _ChatIndex(earlier[0].message_id, earlier[-1].message_id, earlier,
                                RecallIndex.build([r.text for r in earlier]))
        with self._lock:
            self._cache[chat_key] = cached
            self._cache.move_to_end(chat_key)
            while len(self._cache) > CACHED_CHATS:
                self._cache.popitem(last=False)
        picked = relevant(conversation_scores(cached.index, [r.text for r in window]), self.k)
        return [_note(cached.turns, doc) for doc in sorted(picked)]

    def _read(self, chat_key: str, before: str, span: tuple[str, str], cached: _ChatIndex | None) -> list[ChatRecord]:
        """The turns `span` names. Reading 2,000 turns takes longer than searching them, so when the window only moved
        on, the turns still cached are kept and only those that left the window since are read."""
        if cached is not None and int(span[0]) >= int(cached.first):
            newest = self.memory.earlier(chat_key, before, NEW_TURNS_READ)
            if newest and int(newest[0].message_id) <= int(cached.last):  # they reach back to what is cached
                # A new turn always gets a higher id than every turn there is, so nothing can have come in between.
                turns = [r for r in cached.turns if int(r.message_id) >= int(span[0])]
                turns += [r for r in newest if int(r.message_id) > int(cached.last)]
                if turns and (turns[0].message_id, turns[-1].message_id) == span:
                    return turns
        return self.memory.earlier(chat_key, before, self.keep)

    def forget(self, chat_key: str) -> None:
        """After /reset: the chat's index goes with its turns."""
        with self._lock:
            self._cache.pop(chat_key, None)


def _note(turns: list[ChatRecord], doc: int) -> MemoryNote:
    said = turns[doc]
    lines = [said] if doc == 0 or turns[doc - 1].speaker == said.speaker else [turns[doc - 1], said]
    return MemoryNote(
        date=said.time.date().isoformat() if said.time else "",
        turns=tuple(ChatTurn(r.speaker, _clip(r.text)) for r in lines),
    )


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 1] + "…"
