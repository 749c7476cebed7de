"""What a reply remembers beyond its window: the persona's memory, the chat's own past, and the profile.

`[memory]` in config.toml turns each on and off:

- `person`: the adapter folder's memory.jsonl + memory.index.npz (finetune/person_memory.py: what the persona said
  in the training chats, with what it answered and when). Loaded at start; a missing, damaged or mismatched file
  stops the start naming the file and the command that rebuilds it (`python -m finetune memory rebuild FOLDER`).
- `chat_recall`: the chat's own turns older than the window (bot/chat_recall.py); never another chat's.
- `notes`: notes a reply gets from each of the two; 0 = as many as the adapter learned with (its manifest's
  `memory.notes`), so a model trained without memory gets no block it never learned to read.
- `profile`: lines the user wrote about the persona (finetune/profile.py), at the top of every prompt
  (ModelBackend.profile).

A reply's notes are both sources' hits merged oldest first, so the latest thing said is read last, next to the
message being answered (a fact that changed comes out new), each note once. The OpenAI-compatible API has no chat (its clients send
the conversation), so it recalls from the persona's memory only.

`ReplyMemory.from_config` is how the daemon builds it; a test or benchmark on a real base does the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from finetune.config import ConfigError
from finetune.model_loading import ModelLoadError, read_adapter_manifest
from finetune.person_memory import INDEX_FILE, MEMORY_FILE, PersonMemory, PersonMemoryError, notes
from finetune.profile import ProfileError, read_profile
from finetune.prompt import ChatTurn, MemoryNote
from finetune.records import ChatRecord

from .chat_recall import ChatRecall
from .memory import MemoryStoreError

log = logging.getLogger("bunshin.memory")


class ReplyMemory:
    """The notes and profile every reply gets. `for_chat` and `for_turns` may run in any thread."""

    def __init__(self, person: PersonMemory | None = None, chats: ChatRecall | None = None, notes: int = 0,
                 profile: Sequence[str] = ()) -> None:
        self.person = person
        self.chats = chats
        self.notes = notes  # per reply, from each source
        self.profile = tuple(profile)

    @classmethod
    def from_config(cls, config, conversations=None) -> ReplyMemory:
        """What `[memory]` asks for, with `conversations` (bot.memory.ConversationMemory) for chat recall (None: no
        chat recall). ConfigError, one line per file, for a profile or a persona memory that cannot be used."""
        m = config.memory
        problems = []
        profile: tuple[str, ...] = ()
        if m.profile:
            try:
                profile = read_profile(Path(m.profile))
            except ProfileError as exc:
                problems.append(f"{exc} ([memory] profile in {config.source})")
        manifest = _manifest(config)
        per_reply = m.notes or int(_learned(manifest).get("notes") or 0)
        person = None
        if m.person and per_reply > 0 and manifest is not None:
            try:
                person = _person_memory(Path(config.model.adapter), manifest)
            except PersonMemoryError as exc:
                off = "" if "person = false" in str(exc) else f" (or serve without it: [memory] person = false in {config.source})"
                problems.append(f"{exc}{off}")
        if problems:
            raise ConfigError(problems)
        chats = None
        if m.chat_recall and per_reply > 0 and conversations is not None:
            chats = ChatRecall(conversations, keep=m.recall_keep, k=per_reply)
        return cls(person, chats, per_reply, profile)

    @property
    def recalls(self) -> bool:
        """Whether a reply can get notes at all (the router skips the work otherwise)."""
        return self.notes > 0 and (self.person is not None or self.chats is not None)

    def for_chat(self, chat_key: str, window: Sequence[ChatRecord]) -> list[MemoryNote]:
        """The notes for a reply in a chat whose prompt holds `window` (ConversationMemory.recent's records):
        the persona's memory searched with those turns, and this chat's own earlier turns, oldest first."""
        if not self.recalls or not window:
            return []
        found = self.for_turns([ChatTurn(r.speaker, r.text) for r in window])
        if self.chats is not None:
            found += self.chats.notes(chat_key, window)
        return merge_notes(found)

    def for_turns(self, turns: Sequence[ChatTurn]) -> list[MemoryNote]:
        """Notes from the persona's memory for a conversation given whole (the API's), oldest first."""
        if self.person is None or self.notes <= 0 or not turns:
            return []
        # A note whose words are in the window already would only repeat them.
        return notes(self.person.recall(turns, self.notes, exclude_texts=[t.text for t in turns]))

    def forget(self, chat_key: str) -> None:
        """After /reset: the chat's recall goes with its turns."""
        if self.chats is not None:
            self.chats.forget(chat_key)

    def describe(self) -> str:
        """One log line of what is on, without anything anyone said."""
        parts = []
        if self.person is not None:
            parts.append(f"the persona's memory ({len(self.person):,} notes, up to {self.notes} a reply)")
        if self.chats is not None:
            parts.append(f"chat recall (each chat's last {self.chats.keep:,} turns, up to {self.notes} notes a reply)")
        if self.profile:
            parts.append(f"a profile of {len(self.profile)} lines")
        return "memory: " + (", ".join(parts) if parts else "only the window of each chat")


def merge_notes(found: Iterable[MemoryNote]) -> list[MemoryNote]:
    """Oldest first (by date; a stable sort keeps each source's own order within a day), each note once: of two
    alike, the later stays."""
    ordered = sorted(found, key=lambda n: n.date)
    seen: set[tuple[ChatTurn, ...]] = set()
    kept = []
    for note in reversed(ordered):
        if note.turns not in seen:
            seen.add(note.turns)
            kept.append(note)
    kept.reverse()
    return kept


def _manifest(config):
    """The adapter's manifest, or None (no adapter; one that cannot be read is reported by the model's loading)."""
    if not config.model.adapter:
        return None
    try:
        return read_adapter_manifest(Path(config.model.adapter))
    except ModelLoadError:
        return None


def _learned(manifest) -> dict:
    """The manifest's `memory` (notes per prompt, entries, sha256 of memory.jsonl); {} without one."""
    memory = getattr(manifest, "memory", None)
    return memory if isinstance(memory, dict) else {}


def _person_memory(folder: Path, manifest) -> PersonMemory | None:
    """The adapter's memory; None for an adapter trained without one. PersonMemoryError for files that are missing
    (where the manifest says it learned with them), damaged, or that do not belong together."""
    if not _learned(manifest) and not (folder / MEMORY_FILE).exists() and not (folder / INDEX_FILE).exists():
        log.info("%s was trained without the persona's memory: replies recall only the chat's own past", folder)
        return None
    memory = PersonMemory.load(folder)
    trained_with = _learned(manifest).get("sha256")
    if trained_with and trained_with != memory.sha256:
        # Someone may have put a newer memory.jsonl in (prepare run again on newer chats): served, but said.
        log.warning("%s: not the %s the adapter was trained with (another dataset's, or an updated one); serving it",
                    folder / MEMORY_FILE, MEMORY_FILE)
    return memory


async def recall_in_thread(metrics, what: str, recall: Callable[..., list[MemoryNote]], *args) -> list[MemoryNote]:
    """`recall(*args)` (ReplyMemory.for_chat or for_turns) in a worker thread, timed into bunshin_recall_seconds.

    A thread, because re-indexing a chat whose window moved takes tens of milliseconds that every platform's
    webhooks would otherwise wait for. A locked or damaged memory file raises MemoryStoreError, as every memory read
    does; any other failure costs the reply its notes, not the reply (`what` names it in the log)."""
    try:
        notes, seconds = await asyncio.to_thread(_timed, recall, *args)
    except MemoryStoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug in recall must not cost the user their reply
        # Named by type and place only: the exception's message could quote the conversation.
        where = traceback.extract_tb(exc.__traceback__)[-1]
        log.error("recalling notes for %s failed (%s at %s:%d); replying without them", what, type(exc).__name__,
                  where.filename, where.lineno)
        metrics.errors.labels("recall").inc()
        return []
    metrics.recall_seconds.observe(seconds)
    return notes


def _timed(work, *args):
    """(what work(*args) returns, the seconds it took), measured in the thread it runs in."""
    started = time.perf_counter()
    result = work(*args)
    return result, time.perf_counter() - started
