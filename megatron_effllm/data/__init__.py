"""Data: tokenisation to megatron-core indexed datasets, blending, dynamic batch loading.

- ``tokenizer``: the source model's tokenizer (HF folder, GGUF, sentencepiece) behind one interface
- ``preprocess``: raw text (jsonl, parquet, HF datasets) -> PREFIX.bin/.idx (+ .meta.json)
- ``blend``: megatron-core GPTDataset / BlendedDataset construction
- ``dynamic_batch``: Sheared-LLaMA dynamic domain weights and the resumable sampler
- ``loader``: ``prepare_data`` and ``make_train_iterator``, what the training loop calls
"""
