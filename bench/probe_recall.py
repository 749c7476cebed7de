"""How often the notes a reply is given hold the answer: the synthetic persona's stated-fact probes, CPU only.

The hybrid system (LoRA + memory) answers a probe from the notes recalled for it (person_memory.reply_notes, as
`finetune eval` gives them). This counts the probes whose recalled notes contain an accepted answer: the most the
hybrid could get right by reading them; beside it the notes shown, those holding neither the answer nor its old
value (unrelated: noise a small model copies from), and the probes shown a changed fact's old value. Beside
bench/memory_facts.py's figures (what the model made of them) it tells retrieval's misses from the model's.

    python bench/probe_recall.py --out bench/results/probe_recall.json [--seeds 0,1,2] [--k 3,6,12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.person_memory import PersonMemory, reply_notes  # noqa: E402
from finetune.probes import fold, read_probes  # noqa: E402


def finetune(*args) -> None:
    subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=REPO, check=True, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--k", default="3,6,12")
    args = p.parse_args()
    result = {"benchmark": "probe_recall", "command": "python " + " ".join(sys.argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="bunshin-probe-recall-"))
        finetune("synth-persona", work / "synth", "--seed", seed)
        finetune("prepare", work / "synth" / "line_export.txt", "--persona", "彩花", "--out", work / "ds",
                 "--timezone", "Asia/Tokyo", "--no-progress")
        memory = PersonMemory.load(work / "ds")
        probes = [p for p in read_probes(work / "synth" / "probes.jsonl") if not p.never_stated]
        by_k = {}
        for k in [int(k) for k in args.k.split(",")]:
            missed, shown, unrelated, old_value = [], 0, 0, 0
            for probe in probes:
                notes = reply_notes(memory, list(probe.turns), k)
                said = [fold(" ".join(t.text for t in n.turns)) for n in notes]
                right = [any(fold(a) in text for a in probe.right) for text in said]
                stale = [any(fold(a) in text for a in probe.stale) for text in said]
                if not any(right):
                    missed.append(probe.id)
                shown += len(notes)
                unrelated += sum(not r and not s for r, s in zip(right, stale, strict=True))
                old_value += any(stale)
            by_k[str(k)] = {"answer_in_notes": len(probes) - len(missed), "probes": len(probes), "missed": missed,
                            "notes_shown": shown, "unrelated_notes": unrelated, "old_value_shown": old_value}
        result["seeds"][str(seed)] = by_k
        print(seed, {k: f"{v['answer_in_notes']}/{v['probes']}" for k, v in by_k.items()}, flush=True)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
