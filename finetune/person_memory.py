"""The persona's memory: everything they said, with what it answered and when, searchable by a conversation.

A LoRA learns how someone talks; what they said about their hometown, job or cat reaches a reply only if
the weights happened to memorise it, and a fact that changed comes out old as often as new. So `prepare`
also writes the persona's own turns (after redaction and `--exclude-speaker`, as the training data) to

    DATASET/memory.jsonl        one note per line, in time order: id, time, conversation_start, source,
                                answered (the turns it replied to), text
    DATASET/memory.index.npz    a character-n-gram BM25 index over them (recall_index.py), which names
                                the sha256 of the memory.jsonl it was built from

and the prompt of each reply carries the notes most relevant to the conversation (prompt.MemoryNote), in
time order with their dates, so what was said last is read last. `train` copies both files into the
adapter, so the bot needs nothing but the adapter folder.

Retrieval for a training or eval sample searches only notes from before the sample's conversation began
(`before=`): never its own conversation, never its future. Serving searches everything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import unicodedata
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .prompt import ChatTurn, MemoryNote, as_turns
from .recall_index import RecallIndex, conversation_scores, relevant
from .style import char_ngrams

MEMORY_FILE = "memory.jsonl"
INDEX_FILE = "memory.index.npz"
ANSWERED_TURNS = 2  # the turns before a persona turn that it answered, kept with it
NOTE_CHARS = 200  # a note's text in a prompt, at most; its start (the answer) matters most
DISTINCT_POOL = 4  # recall looks at k times this many notes to find k that say different things
# A persona's note must score this share of the best one to be shown (a chat's own older turns keep
# recall_index.RELATIVE_FLOOR). Unrelated notes cost: Gemma 3 270M shown the one note that holds the answer repeats
# it, shown it between unrelated ones it mostly does not (the synthetic persona's probes: right for 6 of 7 probes
# given one note, 2 of 15 given more; seed 0, H100). With this floor (and a later note's 30%, recall_index.relevant)
# the notes of the three synthetic personas' 66 probes still hold the answer for 63, beside 37 unrelated notes
# instead of 53 (bench/probe_recall.py).
NOTE_FLOOR = 0.6
REBUILD = "python -m finetune memory rebuild {folder}"
DRAWN_SHARE = 0.3  # a reply shares this much of its character pairs with a note: it draws on the note
STOCK_TIMES = 3  # a reply said this many times is a stock phrase, not something it drew from a note


class PersonMemoryError(Exception):
    """A memory file or index that is missing, corrupt or from another dataset; the message says which command fixes it."""


@dataclass(frozen=True)
class MemoryEntry:
    id: int
    time: datetime  # when the persona said it (aware, UTC)
    conversation_start: datetime
    source: str
    answered: tuple[ChatTurn, ...]
    text: str
    speaker: str

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "time": self.time.isoformat(),
            "conversation_start": self.conversation_start.isoformat(),
            "source": self.source,
            "answered": [{"speaker": t.speaker, "text": t.text} for t in self.answered],
            "speaker": self.speaker,
            "text": self.text,
        }

    def search_text(self) -> str:
        # The question it answered is indexed too: "出身どこ？" finds "新潟だよ" through the question.
        return "\n".join([*(t.text for t in self.answered), self.text])

    def note(self) -> MemoryNote:
        return MemoryNote(
            date=self.time.date().isoformat(),
            turns=(*(_clip_turn(t) for t in self.answered[-1:]), _clip_turn(ChatTurn(self.speaker, self.text))),
        )


def answered_question(entry: MemoryEntry) -> str:
    """The question a note answered, folded (NFKC, one line), where the turn right before it asks one: "" otherwise.
    Only a question marks two answers as one fact's old and new value; "おっけー" answered twice says nothing."""
    if not entry.answered:
        return ""
    asked = _one_line(unicodedata.normalize("NFKC", entry.answered[-1].text))
    return asked if asked.endswith("?") else ""


def _one_line(text: str) -> str:
    """Runs of spaces and line breaks as one space: how notes are shown, and compared with each other."""
    return " ".join(text.split())


def _clip_turn(turn: ChatTurn) -> ChatTurn:
    text = _one_line(turn.text)  # one line per turn in the note
    return ChatTurn(turn.speaker, text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 1] + "…")


def entries_from_conversations(conversations: Iterable, persona: str) -> list[MemoryEntry]:
    """One entry per persona turn with typed text (placeholders alone say nothing), in time order."""
    found = []
    for conv in conversations:
        for position, turn in enumerate(conv.turns):
            if turn.speaker != persona or not turn.typed.strip():
                continue
            answered = tuple(
                ChatTurn(t.speaker, t.text) for t in conv.turns[max(0, position - ANSWERED_TURNS) : position]
                if t.speaker != persona and t.text.strip()
            )
            found.append((turn.time, conv.start, conv.source, answered, turn.typed))
    found.sort(key=lambda e: e[0])
    return [MemoryEntry(i, t, start, src, ans, text, persona) for i, (t, start, src, ans, text) in enumerate(found)]


def write_memory(folder: Path, entries: Sequence[MemoryEntry]) -> str:
    """memory.jsonl and its index into `folder` (a staging folder: the caller makes them appear atomically).
    Returns the sha256 of memory.jsonl."""
    body = "".join(json.dumps(e.as_json(), ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
    digest = hashlib.sha256(body).hexdigest()
    (folder / MEMORY_FILE).write_bytes(body)
    index = RecallIndex.build([e.search_text() for e in entries])
    with open(folder / INDEX_FILE, "wb") as f:
        index.save(f, source_sha256=digest)
    return digest


def rebuild_index(folder: Path) -> int:
    """Rebuild memory.index.npz from memory.jsonl in place (atomically); returns the number of notes."""
    folder = Path(folder)
    entries, digest = _read_entries(folder / MEMORY_FILE)
    index = RecallIndex.build([e.search_text() for e in entries])
    buffer = io.BytesIO()
    index.save(buffer, source_sha256=digest)
    target = folder / INDEX_FILE
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, target)
    return len(entries)


def _parse_time(value: object, where: str, key: str) -> datetime:
    if not isinstance(value, str):
        raise PersonMemoryError(f"{where}: {key} is not a time")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise PersonMemoryError(f"{where}: {key} is not an ISO time") from None
    if t.tzinfo is None:
        raise PersonMemoryError(f"{where}: {key} has no UTC offset")
    return t


def _read_entries(path: Path) -> tuple[list[MemoryEntry], str]:
    folder = path.parent
    if not path.is_file():
        raise PersonMemoryError(
            f"{path}: no memory file (made by `python -m finetune prepare`; re-run prepare for this dataset, "
            f"or turn the memory off with [memory] person = false)"
        )
    body = path.read_bytes()
    entries = []
    for n, raw in enumerate(body.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PersonMemoryError(f"{where}: not a JSON line (the file is damaged; re-run prepare to rebuild {folder})") from None
        answered = row.get("answered") if isinstance(row, dict) else None
        if not (isinstance(row, dict) and isinstance(row.get("text"), str) and isinstance(row.get("speaker"), str)
                and isinstance(row.get("source"), str) and isinstance(answered, list)
                and all(isinstance(a, dict) and isinstance(a.get("speaker"), str) and isinstance(a.get("text"), str) for a in answered)):
            raise PersonMemoryError(f"{where}: not a memory note (needs text, speaker, source, answered)")
        entries.append(MemoryEntry(
            id=len(entries),
            time=_parse_time(row.get("time"), where, "time"),
            conversation_start=_parse_time(row.get("conversation_start"), where, "conversation_start"),
            source=row["source"],
            answered=tuple(ChatTurn(a["speaker"], a["text"]) for a in answered),
            text=row["text"],
            speaker=row["speaker"],
        ))
        if len(entries) > 1 and entries[-1].time < entries[-2].time:
            raise PersonMemoryError(f"{where}: notes are not in time order (re-run prepare to rebuild {folder})")
    return entries, hashlib.sha256(body).hexdigest()


class PersonMemory:
    """The notes and their index, checked to belong together; `recall` finds notes for a conversation."""

    def __init__(self, entries: list[MemoryEntry], index: RecallIndex, sha256: str = ""):
        self.entries = entries
        self.index = index
        self.sha256 = sha256  # of the memory.jsonl the notes came from
        self._times = [e.time for e in entries]

    @classmethod
    def load(cls, folder: Path) -> PersonMemory:
        """From a dataset or adapter folder. PersonMemoryError (naming the file and the command that rebuilds it)
        for a missing, corrupt or mismatched index."""
        folder = Path(folder)
        entries, digest = _read_entries(folder / MEMORY_FILE)
        index_path = folder / INDEX_FILE
        rebuild = REBUILD.format(folder=folder)
        if not index_path.is_file():
            raise PersonMemoryError(f"{index_path}: the memory index is missing; rebuild it with `{rebuild}`")
        try:
            index, meta = RecallIndex.load(index_path)
        except ValueError as exc:
            raise PersonMemoryError(f"{index_path}: {exc}; rebuild it with `{rebuild}`") from None
        if meta.get("source_sha256") != digest or index.doc_count != len(entries):
            raise PersonMemoryError(
                f"{index_path}: built from another {MEMORY_FILE} (another dataset or an edited file); rebuild it with `{rebuild}`"
            )
        return cls(entries, index, digest)

    def __len__(self) -> int:
        return len(self.entries)

    def recall(self, context: Sequence[ChatTurn], k: int, *, before: datetime | None = None,
               exclude_texts: Iterable[str] = ()) -> list[MemoryEntry]:
        """Up to `k` notes most relevant to the conversation's latest turns, oldest first.

        `before`: only notes said before that time (a training sample's conversation start).
        `exclude_texts`: notes whose text is already in the prompt (a context turn) are not repeated."""
        if k <= 0 or not self.entries or not context:
            return []
        limit = bisect_left(self._times, before) if before is not None else None
        skip = {_one_line(t) for t in exclude_texts}
        scores = conversation_scores(self.index, [t.text for t in context], limit=limit)
        # Room for the same words said again (the persona's stock phrases, a fact told twice): they would take the
        # k places of notes that say something else.
        candidates = relevant(scores, DISTINCT_POOL * k + len(skip), NOTE_FLOOR)
        return sorted(self._distinct(candidates, skip, k), key=lambda e: e.time)

    def _distinct(self, docs: list[int], skip: set[str], k: int) -> list[MemoryEntry]:
        """The first `k` of `docs` (best first) that say different things, leaving out `skip`. Two notes say the
        same thing when their texts are alike (a stock phrase, a fact told twice) or when they answer the same
        question ("スマホなに使ってる？" asked in May and again in October): of those only the later one is kept,
        so a fact that changed comes out new and its old value is not shown beside it (of two notes alike the later
        stays, as in the bot's own merge of its notes, bot/reply_memory.merge_notes)."""
        kept: dict[str, MemoryEntry] = {}  # by what it says: its question, else its text
        key_of_text: dict[str, str] = {}
        for doc in docs:
            entry = self.entries[doc]
            text = _one_line(entry.text)
            if text in skip:
                continue
            question = answered_question(entry)
            key = key_of_text.get(text) or ("?" + question if question else "=" + text)
            if key in kept:
                if entry.time <= kept[key].time:
                    continue
                key_of_text.pop(_one_line(kept[key].text), None)
            elif len(kept) >= k:
                continue
            kept[key] = entry
            key_of_text[text] = key
        return list(kept.values())



def notes(entries: Sequence[MemoryEntry]) -> list[MemoryNote]:
    return [e.note() for e in entries]


def sample_notes(memory: PersonMemory | None, sample: dict, k: int, *, with_reply: bool = False) -> list[MemoryNote]:
    """The notes a prepared sample's prompt carries: recalled from before its conversation began.

    `with_reply` (train --memory-from-reply): the query is the conversation and the reply to learn, so the notes
    are the past messages that bear on what the person answered. Still only the past: the reply picks among what
    was said before, it is never a note itself. In real chats a fact is rarely asked twice, so notes recalled by the
    conversation alone almost never hold the answer, and a LoRA learns to ignore them; with the reply in the
    query, the notes that hold it are the ones shown, as they are when a later question is served.

    A sample without `conversation_start` (a dataset prepared before the memory existed) gets none rather
    than a guess: a later cut-off could show the model its own conversation."""
    start = sample.get("conversation_start")
    if memory is None or k <= 0 or not isinstance(start, str):
        return []
    try:
        before = datetime.fromisoformat(start)
    except ValueError:
        return []
    query = as_turns(sample["context"])
    if with_reply:
        query = [*query, ChatTurn(sample["persona"], sample["target"])]
    return notes(memory.recall(query, k, before=before))


def _pairs(text: str) -> set[str]:
    return set(char_ngrams("".join(text.split()), 2))


def drawn_on_notes(sample: dict, notes_shown: Sequence[MemoryNote], said_times: Counter) -> bool:
    """Whether a training sample's reply draws on one of the notes its prompt carries (train --memory-drill):
    its lines that are no stock phrase (said STOCK_TIMES times or more: "笑った笑" recalled beside "笑った笑"
    teaches nothing about memory) share DRAWN_SHARE of their character pairs with one of the persona's lines
    there."""
    own = [line for line in sample["target"].splitlines() if said_times[_one_line(line)] < STOCK_TIMES]
    pairs = _pairs("".join(own))
    if len(pairs) < 3:
        return False
    persona = sample["persona"]
    return any(len(pairs & _pairs(turn.text)) >= DRAWN_SHARE * len(pairs)
               for note in notes_shown for turn in note.turns if turn.speaker == persona)


def said_times(memory: PersonMemory) -> Counter:
    """How often the persona said each line (spaces folded), for drawn_on_notes."""
    return Counter(_one_line(line) for e in memory.entries for line in e.text.splitlines())


def copy_memory(source: Path, target: Path) -> None:
    """memory.jsonl and its index from a dataset folder into an adapter's staging folder."""
    import shutil

    for name in (MEMORY_FILE, INDEX_FILE):
        shutil.copyfile(Path(source) / name, Path(target) / name)


def reply_notes(memory: PersonMemory, context: Sequence[ChatTurn], k: int, *, examples: int = 0, seed: int = 0,
                key: str = "") -> list[MemoryNote]:
    """The notes of a reply asked now (an eval probe, a `chat` message), oldest first: the `k` the whole memory
    recalls for the conversation and, for the prompt-only system, `examples` of the persona's other messages
    (example_notes, drawn with `seed` and `key`)."""
    found = notes(memory.recall(context, k))
    if examples:
        found = example_notes(memory, {"id": key}, examples, seed, besides=found) + found
    return sorted(found, key=lambda n: n.date)


def example_notes(memory: PersonMemory, sample: dict, count: int, seed: int, besides: Sequence[MemoryNote] = ()) -> list[MemoryNote]:
    """`count` of the persona's messages as examples of how they write (the prompt-only system's few shots):
    drawn with `seed` and the sample's id from before the sample's conversation (all of them for a probe),
    leaving out notes already recalled."""
    import random

    start = sample.get("conversation_start")
    limit = bisect_left(memory._times, datetime.fromisoformat(start)) if isinstance(start, str) else len(memory)
    taken = {n.turns[-1].text for n in besides}
    pool = [e for e in memory.entries[:limit] if e.note().turns[-1].text not in taken]
    rng = random.Random(f"{seed}-{sample.get('id', '')}")
    return [e.note() for e in rng.sample(pool, min(count, len(pool)))]

