"""The generation engine: requests with their own sampling in, text and finish reasons out.

The lowest layer of bunshin's serving path: it imports torch and transformers and nothing of bot/ or finetune/,
which both use it (the bot's worker, `finetune eval` and `finetune chat`). Its parts, one idea each:

- request.py: `SamplingParams`, `EngineRequest`, `EngineOutput`: what every engine takes and reports;
- scheduler.py: what the next step runs (a prefill of waiting prompts, or a decode of every running reply);
- model_runner.py: the forward passes over the static per-chat KV cache (slot_attention.py), CUDA graphs, compile;
- sampler.py: each row's own temperature, top-k, top-p, repetition penalty and seed, in one batched pass;
- detokenizer.py: a reply's text as its tokens come, with stop strings that never leak into it;
- slot_engine.py: the engine that puts them together; slot_reuse.py: which slot a prompt goes to, and what of it the
  slot's cache already holds.
"""
