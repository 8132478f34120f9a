# Two commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheel of PyTorch (lies on disk on our CPU machines). GPU users: install your CUDA torch
# into the venv first, then `make test TORCH_SPEC=` (an empty spec keeps what is installed).
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test demo demo-data clean

DEMO_DATA := data/sample
DEMO_RUN  := runs/demo
# One thread per rank: the demo runs 2 ranks on 2 cores.
DEMO_ENV  := OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PIP) install -q "$(TORCH_SPEC)")
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --durations=15 tests

# The built-in corpus (Python's standard library + synthetic biographies), a 4096-token BPE and
# the indexed dataset; nothing is downloaded.
$(DEMO_DATA)/sample_text_document.idx: $(VENV)/.installed
	$(PY) tools/make_sample_corpus.py --out $(DEMO_DATA) --size-mb 8
	$(PY) tools/train_tokenizer.py --input $(DEMO_DATA)/sample.jsonl.zst --vocab-size 4096 --out $(DEMO_DATA)/tokenizer.json
	$(PY) tools/preprocess_data.py --input $(DEMO_DATA)/sample.jsonl.zst --tokenizer $(DEMO_DATA)/tokenizer.json \
		--output-prefix $(DEMO_DATA)/sample --append-eod --workers 2

demo-data: $(DEMO_DATA)/sample_text_document.idx

# Train deepspeed_configs/demo.json on 2 CPU ranks (pp=2), plot, export to Hugging Face, generate.
demo: install demo-data
	rm -rf $(DEMO_RUN)
	$(DEMO_ENV) $(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --config demo.json
	$(PY) tools/plot_metrics.py $(DEMO_RUN) --out $(DEMO_RUN)/loss.png
	$(PY) tools/convert_to_hf.py --checkpoint $(DEMO_RUN)/checkpoints --out $(DEMO_RUN)/hf
	$(PY) tools/generate.py --checkpoint $(DEMO_RUN)/checkpoints --max-new-tokens 60 --temperature 0 \
		--prompt "def __init__(self"
	$(PY) tools/evaluate.py --checkpoint $(DEMO_RUN)/checkpoints --facts $(DEMO_DATA)/bios_facts.jsonl --people 50

clean:
	rm -rf $(VENV) .cache runs build *.egg-info
