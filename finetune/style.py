"""Does a set of replies read like the person? Style features of a reply set, and how far two sets are apart.

A clone can be fluent and still not sound like the person: too long, too polite, no 笑, the wrong
emoji. Content overlap (chrF against the real reply) does not see this, and a single "looks like
them" number would hide what is off. So a reply set is described by ten features a reader of the
chat would notice, each one computed the same way for the real replies and for every system, and
each compared with a measure that fits its shape:

- distributions (reply length, messages per reply, sentence endings, script mix) are compared
  with the Jensen-Shannon divergence, base 2: symmetric, in [0, 1], and defined where one side
  has a bin the other never uses (a model that never ends a line with じゃん);
- rates of markers (laughter and emoji per reply, punctuation per 100 characters) with the
  Bray-Curtis dissimilarity, which keeps scale: 笑 twice as often as the person is a difference
  even when the mix of markers is the same, and a side that uses none at all is maximally far;
- the character n-gram vectors with the cosine distance (what is said, and how, in one vector);
- named figures (distinct-n, share copied from the context) with a mean relative difference.

Every distance lies in [0, 1] and `style_distance` is their plain mean, so no feature dominates
by its units and two reports can be compared. Everything is counted on characters or grapheme
clusters, not on a tokenizer: the measure must not change with the model being judged.

Replies are plain text; the messages of a burst are separated by "\\n", and rinna's `<NL>` is
read as one too, so replies from other tools are counted the same way.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import regex

# key -> (label, measure), in display order: report.json's "features".
FEATURES: dict[str, tuple[str, str]] = {
    "length": ("Reply length (characters)", "jsd"),
    "messages": ("Messages per reply", "jsd"),
    "endings": ("Sentence endings", "jsd"),
    "laughter": ("Laughter", "braycurtis"),
    "emoji": ("Emoji and kaomoji", "braycurtis"),
    "punctuation": ("Punctuation", "braycurtis"),
    "script": ("Script mix", "jsd"),
    "ngrams": ("Character n-grams", "cosine"),
    "diversity": ("Diversity (distinct-n)", "ratio"),
    "copying": ("Copying the context", "ratio"),
}


def normalize_reply(reply: str) -> str:
    """A reply as lines joined by "\\n": rinna writes a newline as `<NL>`; outer whitespace is no style."""
    return reply.replace("<NL>", "\n").replace("\r\n", "\n").replace("\r", "\n").strip()


def reply_lines(reply: str) -> list[str]:
    """The messages of a (normalized) reply: its non-empty lines."""
    return [line for line in reply.split("\n") if line.strip()]


# --- grapheme clusters and emoji ---------------------------------------------------------------------------------

_GRAPHEME = regex.compile(r"\X")
_PICTOGRAPHIC = regex.compile(r"\p{Extended_Pictographic}")
_PRESENTATION = regex.compile(r"\p{Emoji_Presentation}")
_FLAG = regex.compile(r"[\U0001F1E6-\U0001F1FF]{2}")
_KEYCAP = "\u20e3"
_VS15, _VS16 = "\ufe0e", "\ufe0f"


def graphemes(text: str) -> list[str]:
    """User-perceived characters: 👨‍👩‍👧, 👍🏽, 🇯🇵 and 1️⃣ are one each, as a reader counts them."""
    return _GRAPHEME.findall(text)


def is_emoji(cluster: str) -> bool:
    if _KEYCAP in cluster or _FLAG.match(cluster) or (_VS16 in cluster and _PICTOGRAPHIC.search(cluster)):
        return True
    found = _PICTOGRAPHIC.search(cluster)
    if not found:
        return False
    # ©, ®, ™, ‼ and arrows are Extended_Pictographic but typed as text; below U+2600 only with emoji presentation.
    return len(cluster) > 1 or ord(cluster) >= 0x2600 or bool(_PRESENTATION.match(cluster))


def emoji_key(cluster: str) -> str:
    """One key per emoji as a reader sees it: ❤ and ❤️ (the keyboard's choice of variation selector) are one."""
    core = cluster.replace(_VS16, "").replace(_VS15, "")
    if len(core) == 1 and not _PRESENTATION.match(core):
        return core + _VS16
    if len(core) == 2 and core.endswith(_KEYCAP):
        return core[0] + _VS16 + _KEYCAP
    return cluster


# --- kaomoji -----------------------------------------------------------------------------------------------------

# A face in brackets: (´・ω・`) (^^) (＾▽＾) (；´Д｀) ＼(^o^)／ m(_ _)m ヽ(・∀・)ノ. Candidates are checked by
# _is_face so that (笑), (明日), (1/2) and (ok) stay words.
_BRACKETED = regex.compile(r"[＼ヽヾ٩⊂mｍ\\]?[(（][^()（）\n]{1,20}[)）][／ノﾉ۶⊃mｍ/]?")
# Digits and dots are no face marks: (10:00~12:00) and (...) are not faces.
_FACE_MARKS = set("・･´`｀＾^ω∀Д▽△▼≧≦;；_＿°ﾟ゜∇εдσ≡˘◕‿ಠ⊙◎○●><＞＜口皿∪∩*＊'oｏTＴ-－=＝ーｰ~〜～+＋ツシ")
_WORDLIKE = regex.compile(r"[\p{Hiragana}\p{Han}]|[A-Za-zＡ-Ｚａ-ｚ]{2}|[\p{Katakana}--[ー・ツシ]]{2}", regex.V1)
# Faces without brackets: ^^ ^_^ ＾▽＾ ^^; >_< T_T -_- ;_; orz OTL ¯\_(ツ)_/¯
_BARE = regex.compile(
    r"¯\\_\(ツ\)_/¯"
    r"|[\^＾][_oｏ・ー\-▽ω]?[\^＾][;；]*"
    r"|[>＞][_.ω][<＜]"
    r"|(?<![A-Za-z])(?:[TＴ][_＿][TＴ]|-_-|[;；]_[;；])(?![A-Za-z])"
    r"|(?<![A-Za-zＡ-Ｚａ-ｚ])(?:orz|Orz|OTL|ｏｒｚ|ＯＴＬ)(?![A-Za-zＡ-Ｚａ-ｚ])"
)


def _is_face(bracketed: str) -> bool:
    opening = min(i for i in (bracketed.find("("), bracketed.find("（")) if i >= 0)
    closing = max(bracketed.rfind(")"), bracketed.rfind("）"))
    inner = bracketed[opening + 1 : closing]
    if _WORDLIKE.search(inner):
        return False
    return sum(ch in _FACE_MARKS for ch in inner) >= 2


def kaomoji_spans(text: str) -> list[tuple[int, int]]:
    """Where the kaomoji are: a regex heuristic (no list can be complete), tuned to keep words in brackets out."""
    spans = [m.span() for m in _BRACKETED.finditer(text) if _is_face(m.group())]
    if spans:  # bare faces inside a bracketed one are part of it
        masked = list(text)
        for start, end in spans:
            masked[start:end] = "\x00" * (end - start)
        rest = "".join(masked)
    else:
        rest = text
    spans += [m.span() for m in _BARE.finditer(rest)]
    return sorted(spans)


# --- laughter ----------------------------------------------------------------------------------------------------

_LATIN_OR_DIGIT = "A-Za-zＡ-Ｚａ-ｚ0-9０-９"
# A run counts once: "www" and "笑笑" are one laugh made louder, not three.
# 笑 as a word (笑顔, 笑う, 笑っ…) and 草 as a plant (草原, 雑草, 草むしり) are not laughter; 草生える is.
# w only after a non-Latin character or at line start, and not inside a word: "wow", "new", "www.example", "wifi".
_LAUGHTER = regex.compile(
    r"(?P<笑>笑+)(?![わいうえおっ顔声話])"
    r"|(?<!\p{Han})(?P<草>草+)(?:(?=生)|(?![\p{Han}むをが]))"
    rf"|(?<![{_LATIN_OR_DIGIT}.])(?P<w>[wWｗＷ]+)(?![A-Za-zＡ-Ｚａ-ｚ]|\.[A-Za-z])"
)
LAUGHTER_LABELS = ("笑", "w", "草")


def laughter_counts(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in text.split("\n"):
        for m in _LAUGHTER.finditer(line):
            counts[m.lastgroup] += 1
    return counts


# --- sentence endings --------------------------------------------------------------------------------------------

# The spec's endings, plus four that are everywhere in casual Japanese chat and separate a casual voice from a
# polite one: だ (the plain copula, casual counterpart of です), た (the plain past, だった included; its polite
# forms ました/でした are folded into ます/です so politeness stays the signal, not tense), かな (wondering; not the
# assertive な) and けど (the trailing softener). Longest suffix wins: よね ends in ね, ですか in か.
_ENDING_SUFFIXES = {
    "じゃん": "じゃん",
    "っす": "っす",
    "っス": "っす",
    "ッス": "っす",
    "ｯｽ": "っす",
    "ました": "ます",
    "ません": "ます",
    "ます": "ます",
    "でした": "です",
    "です": "です",
    "かな": "かな",
    "けど": "けど",
    "ね": "ね",
    "よ": "よ",
    "な": "な",
    "わ": "わ",
    "か": "か",
    "の": "の",
    "ぞ": "ぞ",
    "ぜ": "ぜ",
    "さ": "さ",
    "だ": "だ",
    "た": "た",
}
_SUFFIXES_LONGEST_FIRST = sorted(_ENDING_SUFFIXES, key=len, reverse=True)
LAUGH_ENDING, MARKS_ONLY, OTHER_ENDING = "笑/w", "(emoji/marks only)", "other"
ENDING_LABELS = ("じゃん", "っす", "です", "ます", "ね", "よ", "な", "わ", "か", "の", "ぞ", "ぜ", "さ", "だ", "た", "かな", "けど",
                 LAUGH_ENDING, MARKS_ONLY, OTHER_ENDING)  # fmt: skip
# Stretching after the ending (ねー, よ〜, じゃんっ) is noise around it, not another ending.
_ELONGATION = set("ー〜～~っッｰ")


def _strip_trailing_noise(line: str) -> str:
    while True:
        line = line.rstrip()
        if not line:
            return line
        spans = kaomoji_spans(line)
        if spans and spans[-1][1] == len(line):
            line = line[: spans[-1][0]]
            continue
        last = graphemes(line[-8:])[-1]  # an emoji cluster is short; ZWJ families fit in 8 code points or are rare
        if is_emoji(last):
            line = line[: -len(last)]
            continue
        ch = line[-1]
        if ch in _ELONGATION or unicodedata.category(ch)[0] in "PSZC":
            line = line[:-1]
            continue
        return line


def sentence_ending(line: str) -> str:
    """The ending class of one message line (see ENDING_LABELS)."""
    core = _strip_trailing_noise(line)
    if not core:
        return MARKS_ONLY
    # Laughter at the end is what the line ends with, whatever precedes it: じゃん笑 is a laughing line.
    last_laugh = None
    for last_laugh in _LAUGHTER.finditer(core):  # noqa: B007 - the last match is the one that may end the line
        pass
    if last_laugh is not None and last_laugh.end() == len(core):
        return LAUGH_ENDING
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if core.endswith(suffix):
            return _ENDING_SUFFIXES[suffix]
    return OTHER_ENDING


# --- punctuation and script --------------------------------------------------------------------------------------

# Full- and half-width are kept apart: which one a person's keyboard gives is part of their style.
PUNCTUATION_LABELS = ("。", "、", "！", "!", "？", "?", "…", "〜")
# An ellipsis however typed is one mark: … …… ‥ ... ・・・
_PUNCTUATION = regex.compile(r"(?P<ellipsis>[…‥]+|\.{2,}|・{2,}|･{2,})|(?P<wave>[〜～~])|(?P<mark>[。、！!？?])")


def punctuation_counts(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for m in _PUNCTUATION.finditer(text):
        kind = m.lastgroup
        counts["…" if kind == "ellipsis" else "〜" if kind == "wave" else m.group()] += 1
    return counts


SCRIPT_LABELS = ("hiragana", "katakana", "half-width kana", "kanji", "latin", "digits", "emoji", "other")
_HAN = regex.compile(r"\p{Han}")


def script_of(cluster: str) -> str:
    if is_emoji(cluster):
        return "emoji"
    ch = cluster[0]
    code = ord(ch)
    if 0x3041 <= code <= 0x309F:
        return "hiragana"
    if 0x30A0 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF:  # ー (U+30FC) included
        return "katakana"
    if 0xFF66 <= code <= 0xFF9F:
        return "half-width kana"
    if _HAN.match(ch):
        return "kanji"
    if ch.isascii() and ch.isalpha() or 0xFF21 <= code <= 0xFF3A or 0xFF41 <= code <= 0xFF5A:
        return "latin"
    if "0" <= ch <= "9" or "０" <= ch <= "９":
        return "digits"
    return "other"


# --- n-grams -----------------------------------------------------------------------------------------------------


def _flat(reply: str) -> str:
    return reply.replace("\n", " ")  # line breaks as a space: n-grams may not glue two messages into a word


def char_ngrams(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Unique character n-grams / all character n-grams, n-grams taken within each reply.

    distinct-n falls as the text grows (more n-grams, the same language), so it compares sides of
    similar length; read it next to the length feature, not alone.
    """
    seen: set[str] = set()
    total = 0
    for reply in replies:
        grams = char_ngrams(_flat(reply), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


# --- copying the context -----------------------------------------------------------------------------------------

COPY_WINDOW = 5  # 5 characters: longer than a shared word (名前, ありがとう), short enough to catch an echoed phrase


def copied_share(reply: str, context: Sequence[dict]) -> float:
    """Share of the reply's characters (line breaks excluded) covered by 5-character substrings of its context."""
    windows = {
        line[i : i + COPY_WINDOW]
        for turn in context
        for line in str(turn.get("text", "")).split("\n")
        for i in range(len(line) - COPY_WINDOW + 1)
    }
    covered = total = 0
    for line in reply.split("\n"):
        hit = [False] * len(line)
        for i in range(len(line) - COPY_WINDOW + 1):
            if line[i : i + COPY_WINDOW] in windows:
                hit[i : i + COPY_WINDOW] = [True] * COPY_WINDOW
        covered += sum(hit)
        total += len(line)
    return covered / total if total else 0.0


# --- the profile of a reply set ----------------------------------------------------------------------------------

LENGTH_BINS = ((0, 0, "0"), (1, 5, "1-5"), (6, 10, "6-10"), (11, 20, "11-20"), (21, 40, "21-40"), (41, 80, "41-80"),
               (81, 160, "81-160"), (161, math.inf, "161+"))  # fmt: skip
MESSAGE_LABELS = ("0", "1", "2", "3", "4+")
TOP_NGRAMS = 12


def reply_chars(reply: str) -> int:
    """Characters as a reader counts them (grapheme clusters), line breaks excluded."""
    return len(graphemes(reply.replace("\n", "")))


def _shares(counts: Counter[str], labels: Sequence[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: (counts[label] / total if total else 0.0) for label in labels}


@dataclass
class StyleProfile:
    """What the report shows of a reply set (`values`: FEATURE -> VALUE) and the full n-gram vector behind it."""

    values: dict[str, dict[str, float]]
    ngram_counts: Counter[str]


def style_profile(replies: Sequence[str], contexts: Sequence[Sequence[dict]]) -> StyleProfile:
    """The ten features of a reply set. `contexts[i]` is the conversation `replies[i]` answers (for `copying`)."""
    if len(replies) != len(contexts):
        raise ValueError(f"{len(replies)} replies but {len(contexts)} contexts")
    texts = [normalize_reply(r) for r in replies]
    n_replies = len(texts) or 1

    length_bins: Counter[str] = Counter()
    message_bins: Counter[str] = Counter()
    endings: Counter[str] = Counter()
    laughter: Counter[str] = Counter()
    emoji: Counter[str] = Counter()
    punctuation: Counter[str] = Counter()
    scripts: Counter[str] = Counter()
    ngrams: Counter[str] = Counter()
    total_chars = 0
    for text in texts:
        clusters = graphemes(text.replace("\n", ""))
        chars = len(clusters)
        total_chars += chars
        length_bins[next(label for low, high, label in LENGTH_BINS if low <= chars <= high)] += 1
        lines = reply_lines(text)
        message_bins[str(len(lines)) if len(lines) < 4 else "4+"] += 1
        endings.update(sentence_ending(line) for line in lines)
        laughter.update(laughter_counts(text))
        emoji.update(emoji_key(c) for c in clusters if is_emoji(c))
        emoji["kaomoji"] += sum(len(kaomoji_spans(line)) for line in lines)
        punctuation.update(punctuation_counts(text))
        scripts.update(script_of(c) for c in clusters if not c.isspace())
        flat = _flat(text)
        for n in (1, 2, 3):
            ngrams.update(char_ngrams(flat, n))

    emoji_value = {key: count / n_replies for key, count in emoji.most_common() if key != "kaomoji"}
    emoji_value["kaomoji"] = emoji["kaomoji"] / n_replies
    longer = Counter({gram: count for gram, count in ngrams.items() if len(gram) > 1})
    longer_total = sum(longer.values())
    # The top list skips n-grams with a space (a line break): they are real but read as nothing in a chart.
    top = [(gram, count) for gram, count in longer.most_common() if " " not in gram][:TOP_NGRAMS]
    copied = [copied_share(text, context) for text, context in zip(texts, contexts, strict=True)]

    values = {
        "length": _shares(length_bins, [label for _, _, label in LENGTH_BINS]),
        "messages": _shares(message_bins, MESSAGE_LABELS),
        "endings": _shares(endings, ENDING_LABELS),
        "laughter": {label: laughter[label] / n_replies for label in LAUGHTER_LABELS},
        "emoji": emoji_value,
        "punctuation": {
            label: (100 * punctuation[label] / total_chars if total_chars else 0.0) for label in PUNCTUATION_LABELS
        },
        "script": _shares(scripts, SCRIPT_LABELS),
        "ngrams": {gram: count / longer_total for gram, count in top},
        "diversity": {
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "distinct_3": distinct_n(texts, 3),
            "unique_replies": len(set(texts)) / n_replies,
        },
        "copying": {
            "copied_chars": sum(copied) / n_replies,
            "copied_replies": sum(share >= 0.5 for share in copied) / n_replies,
        },
    }
    return StyleProfile(values, ngrams)


# --- distances, each in [0, 1] -----------------------------------------------------------------------------------


def jensen_shannon(a: dict[str, float], b: dict[str, float]) -> float:
    """JS divergence, log base 2, of two histograms (normalized here). 0 when both are empty, 1 when one is."""
    labels = a.keys() | b.keys()
    total_a, total_b = sum(a.values()), sum(b.values())
    if not total_a and not total_b:
        return 0.0
    if not total_a or not total_b:
        return 1.0
    divergence = 0.0
    for label in labels:
        p, q = a.get(label, 0.0) / total_a, b.get(label, 0.0) / total_b
        m = (p + q) / 2
        if p:
            divergence += p * math.log2(p / m) / 2
        if q:
            divergence += q * math.log2(q / m) / 2
    return min(1.0, max(0.0, divergence))


def bray_curtis(a: dict[str, float], b: dict[str, float]) -> float:
    """Σ|a−b| / Σ(a+b) over the union of labels; 0 when both are all zero."""
    labels = a.keys() | b.keys()
    total = sum(a.get(label, 0.0) + b.get(label, 0.0) for label in labels)
    if not total:
        return 0.0
    return sum(abs(a.get(label, 0.0) - b.get(label, 0.0)) for label in labels) / total


def cosine_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """1 − cosine similarity of two count vectors: 0 when both are empty, 1 when only one is."""
    norm_a = math.sqrt(sum(v * v for v in a.values()))
    norm_b = math.sqrt(sum(v * v for v in b.values()))
    if not norm_a and not norm_b:
        return 0.0
    if not norm_a or not norm_b:
        return 1.0
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    dot = sum(v * large.get(k, 0.0) for k, v in small.items())
    return min(1.0, max(0.0, 1.0 - dot / (norm_a * norm_b)))


def ratio_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Mean over labels of |a−b| / max(a, b) (0 where both are 0): figures on different scales weigh the same."""
    labels = a.keys() | b.keys()
    if not labels:
        return 0.0
    terms = []
    for label in labels:
        x, y = a.get(label, 0.0), b.get(label, 0.0)
        top = max(abs(x), abs(y))
        terms.append(abs(x - y) / top if top else 0.0)
    return sum(terms) / len(terms)


MEASURES = {"jsd": jensen_shannon, "braycurtis": bray_curtis, "cosine": cosine_distance, "ratio": ratio_distance}


def feature_distances(system: StyleProfile, real: StyleProfile) -> dict[str, float]:
    """FEATURE -> distance in [0, 1] between a system's replies and the real ones."""
    distances = {}
    for key, (_, measure) in FEATURES.items():
        if key == "ngrams":  # the full vector, not the top list the report shows
            distances[key] = cosine_distance(system.ngram_counts, real.ngram_counts)
        else:
            distances[key] = MEASURES[measure](system.values[key], real.values[key])
    return distances


def style_distance(distances: dict[str, float]) -> float:
    """The plain mean of the feature distances: each is in [0, 1], so none dominates by its units."""
    return sum(distances.values()) / len(distances)
