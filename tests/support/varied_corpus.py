"""A chat corpus of real size and variety, made up offline: what a tokenizer meets in a person's real export.

A real LINE or Discord history has tens of thousands of messages over thousands of distinct characters, a few
hundred kanji common and the rest rare (a Zipf-like tail), with kana, English, digits and emoji mixed in. The
built-in corpus of `tiny-model` has a few hundred characters; a tokenizer setting that works on it may not on this
(tests/test_model_families.py).
"""

from __future__ import annotations

import itertools
import random

_KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 5000)]  # CJK Unified Ideographs, in code point order
_KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
_WORDS = ("the of and to in is you that it was for on are with they at be this have from or one had by but not what "
          "all were we when your can said there use an each which she do how their if will up other about out many "
          "then them these so some her would make like him into time has look two more write go see number no way "
          "could people my than first water been call who oil its now find long down day did get come made may part "
          "lol ok omg tbh btw thx").split()
_EMOJI = ["😂", "🥺", "👍", "🎉", "😊", "🙏", "💦", "✨", "🍣", "🐱"]


def varied_lines(count: int, seed: int = 0) -> list[str]:
    """`count` chat lines: each a few runs of kana, Zipf-distributed kanji, English words, digits or an emoji."""
    rng = random.Random(seed)
    kanji_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(_KANJI))))
    lines = []
    for _ in range(count):
        runs = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            if kind < 0.45:
                runs.append("".join(rng.choices(_KANA, k=rng.randint(1, 6))))
            elif kind < 0.8:
                runs.append("".join(rng.choices(_KANJI, cum_weights=kanji_weights, k=rng.randint(1, 3))))
            elif kind < 0.93:
                runs.append(" ".join(rng.choices(_WORDS, k=rng.randint(1, 5))) + " ")
            elif kind < 0.97:
                runs.append(str(rng.randint(0, 9999)))
            else:
                runs.append(rng.choice(_EMOJI))
        lines.append("".join(runs).strip())
    return lines
