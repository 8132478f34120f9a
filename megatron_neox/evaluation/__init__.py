"""Evaluation: lm-evaluation-harness tasks on our model (`lm.NeoXLM` over a merged or a sharded
model, `backends`), the papers' task presets, perplexity, and the BioS knowledge probe."""
