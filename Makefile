# Two commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheel of PyTorch (lies on disk on our CPU machines). GPU users: install your CUDA torch
# into the venv first, then `make test TORCH_SPEC=` (an empty spec keeps what is installed).
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test demo demo-data demo-chat clean

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

# Fine-tune the demo model as a chat model, then align it with DPO (built-in data, no download):
# chat and preference sets from the sample corpus's biographies -> preprocess with the chat template
# -> import the demo's Hugging Face export -> SFT (2 ranks) -> DPO from the SFT checkpoint -> export
# -> lm-eval task -> a chat answer -> the held-out reward accuracy. Runs `make demo` first if needed.
CHAT_DATA := data/chat
CHAT_RUN  := runs/chat
CHAT_TOK  := $(DEMO_DATA)/tokenizer.json
demo-chat: install demo-data
	test -f $(DEMO_RUN)/hf/config.json || $(MAKE) demo
	rm -rf $(CHAT_RUN)
	$(PY) tools/make_chat_data.py --facts $(DEMO_DATA)/bios_facts.jsonl --out $(CHAT_DATA)
	$(PY) tools/preprocess_data.py --format sft --input $(CHAT_DATA)/sft.jsonl --tokenizer $(CHAT_TOK) \
		--output-prefix $(CHAT_DATA)/sft --max-length 129
	$(PY) tools/preprocess_data.py --format dpo --input $(CHAT_DATA)/prefs.jsonl --tokenizer $(CHAT_TOK) \
		--output-prefix $(CHAT_DATA)/prefs --max-length 129
	$(PY) tools/convert_from_hf.py --hf-dir $(DEMO_RUN)/hf --out $(CHAT_RUN)/base
	$(DEMO_ENV) $(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --config demo-chat-sft.json
	$(DEMO_ENV) $(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --config demo-chat-dpo.json
	$(PY) tools/convert_to_hf.py --checkpoint $(CHAT_RUN)/dpo/checkpoints --out $(CHAT_RUN)/hf
	$(PY) tools/evaluate.py --checkpoint $(CHAT_RUN)/dpo/checkpoints --tasks chat_facts --include-path $(CHAT_DATA)/tasks
	$(PY) tools/generate.py --checkpoint $(CHAT_RUN)/dpo/checkpoints --chat --max-new-tokens 40 \
		--prompt "$$(cat $(CHAT_DATA)/question.txt)"
	$(PY) tools/plot_metrics.py $(CHAT_RUN)/dpo --out $(CHAT_RUN)/dpo/metrics.png

clean:
	rm -rf $(VENV) .cache runs build *.egg-info
