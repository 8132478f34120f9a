"""Data: indexed .bin/.idx files (indexed.py), GPT-3 packed samples with cached indices
(gpt_dataset.py), blends, splits and the data section's defaults and checks (blended.py), the
resumable data-parallel loader and the one micro-batch builder (loader.py), jsonl/zst readers and
preprocessing (readers.py, preprocess.py), and the built-in sample corpus (corpus.py). Below the
config: `cfg` arguments here are duck-typed `DataConfig`s."""
