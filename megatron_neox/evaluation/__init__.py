"""Evaluation: lm-evaluation-harness tasks on our model (`lm.NeoXLM` over a merged or a sharded
model, `backends`), the papers' task presets, perplexity, and the BioS knowledge probe.

lm-eval is an optional extra (`pip install -e .[eval]`): perplexity needs only torch, so nothing
here imports it at module level; `require_lm_eval` is called by the paths that use it."""
import importlib.util

from megatron_neox.errors import ConfigError

EVAL_EXTRA = "pip install -e .[eval]"


def require_lm_eval(what: str) -> None:
    """Raise a ConfigError (exit 2 in tools) naming the extra to install when lm-eval is missing.

    `what` names the option that needs it, e.g. '--tasks'."""
    try:
        found = importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
        found = False
    if not found:
        raise ConfigError(f"{what} needs lm-evaluation-harness (the `lm_eval` package), which is not installed; "
                          f"install the evaluation extra: {EVAL_EXTRA}")
