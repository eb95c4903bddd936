"""Evaluation: held-out perplexity (``perplexity``), zero-shot commonsense tasks (``tasks``,
``zero_shot``), lm-evaluation-harness on the same local data (``lm_eval_adapter``), and model
loading for ``effllm-evaluate`` (``model_loading``)."""
