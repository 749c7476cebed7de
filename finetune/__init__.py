"""bunshin's offline side: import chat exports, build a dataset, train a LoRA adapter.

Nothing heavy is imported here: `python -m finetune inspect` must start in milliseconds,
so torch/transformers are imported only by the commands that need them.
"""
