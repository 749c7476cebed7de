"""The LoRA recipe most rinna tutorials teach, measured the same way as `finetune train`.

8-bit base weights (bitsandbytes) with k-bit preparation, LoRA r=8 / alpha 16 on
`query_key_value`, fp16 mixed precision, batches of 8 samples in random order padded to the
longest, loss on every token. Prints one JSON line: useful (non-padding) tokens per second
and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quantize", choices=["8bit", "none"], default="8bit")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    from finetune.prompt import as_turns, encode_prompt, encode_reply
    from finetune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(a.model))
    samples = [json.loads(x) for x in (a.data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    # The tutorials' instruction template; the full text is the label (loss on every token).
    encoded = [
        encode_prompt(tokenizer, as_turns(s["context"]), s["persona"], "instruction") + encode_reply(tokenizer, s["target"])
        for s in samples
    ]
    encoded = [e[:512] for e in encoded]

    kwargs = {"device_map": {"": 0}}
    if a.quantize == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    else:
        kwargs["dtype"] = torch.float16
    model = AutoModelForCausalLM.from_pretrained(str(a.model), **kwargs)
    model = prepare_model_for_kbit_training(model) if a.quantize == "8bit" else model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value"],
                                             lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    pad = tokenizer.pad_id
    counter = {"useful": 0}

    def collate(batch):
        longest = max(len(x) for x in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        counter["useful"] += int(mask.sum())
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    marks = []  # (time, useful tokens so far) at each step's end, as finetune train measures

    class Clock(TrainerCallback):
        # Waits for the GPU only where a figure is read (after warm-up, at the end), as finetune train does.
        def _mark(self, wait):
            if wait:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), counter["useful"]))

        def on_train_begin(self, args, state, control, **kw):
            self._mark(True)

        def on_step_end(self, args, state, control, **kw):
            self._mark(len(marks) == 5)

        def on_train_end(self, args, state, control, **kw):
            self._mark(True)

    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir="/tmp/community-out", per_device_train_batch_size=a.batch, max_steps=a.steps,
                               learning_rate=3e-4, fp16=True, logging_steps=10, save_strategy="no", report_to=[],
                               remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0),
        train_dataset=encoded,
        data_collator=collate,
        callbacks=[Clock()],
    )
    trainer.train()
    # Leave out the first steps' one-time set-up, exactly as finetune train's figure does.
    skip = 5 if len(marks) > 10 else 0
    (t0, n0), (t1, n1) = marks[skip], marks[-1]
    print(json.dumps({
        "recipe": f"community {a.quantize} r=8 qkv batch {a.batch} random order padded, loss on all tokens",
        "steps": a.steps,
        "useful_tokens_per_second": round((n1 - n0) / (t1 - t0), 1),
        "useful_tokens_per_second_overall": round((n1 - marks[0][1]) / (t1 - marks[0][0]), 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }))


if __name__ == "__main__":
    main()
