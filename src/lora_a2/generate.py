"""``lora-a2 generate RUN_DIR``: answer prompts with what a causal-LM federation trained.

Loads the run's base model as the run did (``config.toml``: the same model name, dtype, and
for ``tiny-random-llama`` its saved random base), adds the exported adapter with PEFT
(``PeftModel.from_pretrained``) and, for FlexLoRA / FLoRA, the dense deltas they keep in the
base weights (``adapter/merged_delta.safetensors``); ``fedavg-full`` exports the whole model.
Prompts go through the same chat template as training, and answers are greedy, computed in
the run's ``train.precision`` (bfloat16 autocast for a ``bf16-mixed`` run, as its evaluation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import load_config
from .errors import UserError
from .models import _quiet_transformers, load_causal_lm, pick_device, position_limit
from .precision import bf16_products_in_fp32, forward
from .tasks import TASKS, resolve_task_name, task_names
from .tasks.causal_lm import generate, prompt_ids


def _trained_task(run_dir: Path) -> str | None:
    """The task the run trained, as its export (``adapter/lora_a2.json``) or summary recorded
    it: ``task.name = "auto"`` resolved again here could differ (another working directory for
    a relative model path, another Hugging Face cache)."""
    for path in (run_dir / "adapter" / "lora_a2.json", run_dir / "summary.json"):
        try:
            task = json.loads(path.read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(task, str) and task:
            return task
    return None


def load_trained(run_dir: Path, base_only: bool = False):
    """(model, tokenizer, train) of a finished causal-LM run (or its base model alone);
    ``train`` is the run's ``[train]`` section, whose ``precision`` and ``bf16_matmul`` its
    answers are computed in."""
    _quiet_transformers()
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"'{run_dir}' holds no run (no config.toml)")
    # the config's own checks only: generating needs neither the run's reporters, nor its
    # fleet file, nor a plugin strategy installed here
    cfg = load_config(run_dir / "config.toml")
    name = _trained_task(run_dir) or resolve_task_name(cfg)
    if name not in task_names():  # every task registered, not only the one imported here
        raise UserError(f"run '{run_dir}' was trained for task '{name}', which is not "
                        f"installed here (tasks: {', '.join(sorted(TASKS))})")
    task = TASKS[name]
    if not task.generative:
        makers = ", ".join(n for n, t in sorted(TASKS.items()) if t.generative)
        raise UserError(f"run '{run_dir}' is a {task.name} run; generate needs a run of a task "
                        f"that generates text ({makers})")
    adapter = run_dir / "adapter"
    if not (adapter / "lora_a2.json").is_file() and not (adapter / "config.json").is_file():
        raise UserError(f"run '{run_dir}' has no exported adapter yet (it has not finished; "
                        f"resume it with lora-a2 run --resume {run_dir})")
    device = pick_device(cfg.engine.device)
    try:
        model, tok = _load(run_dir, adapter, cfg, base_only)
    except (OSError, ValueError, KeyError, AttributeError, RuntimeError, SafetensorError) as e:
        # what a damaged or edited file raises (a torch or library bug, or no memory, is not
        # this, and keeps its traceback)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"run '{run_dir}': its exported model cannot be loaded "
                        f"({type(e).__name__}: {first}); export it again with "
                        f"lora-a2 run --resume {run_dir}") from None
    except Exception as e:
        if type(e) is not Exception:  # the tokenizers library's own errors are plain Exception
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"run '{run_dir}': its exported tokenizer cannot be loaded ({first}); "
                        f"export it again with lora-a2 run --resume {run_dir}") from None
    return model.to(device).eval(), tok, cfg.train


def _load(run_dir: Path, adapter: Path, cfg, base_only: bool):
    """(model, tokenizer) from the run's files (see :func:`load_trained`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    whole_model = not (adapter / "adapter_config.json").is_file()  # a full-model strategy's
    if whole_model and not base_only:
        return AutoModelForCausalLM.from_pretrained(str(adapter)), tok
    if (run_dir / "base_model").is_dir():  # a random base built in code, saved by the run
        base = AutoModelForCausalLM.from_pretrained(str(run_dir / "base_model"),
                                                    torch_dtype="auto")  # as saved
    else:
        base, _, _ = load_causal_lm(cfg.model.name, cfg.seed, cfg.model.dtype)
    if base_only:
        return base, tok
    deltas = adapter / "merged_delta.safetensors"
    if deltas.is_file():
        from safetensors.torch import load_file

        with torch.no_grad():
            for name, delta in load_file(str(deltas)).items():
                w = base.get_submodule(name).weight  # W0 + Δ in float32, rounded once
                w.copy_((w.float() + delta.to(w.device, torch.float32)).to(w.dtype))
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter)), tok


def answer(model, tokenizer, prompts: list[str], input_: str = "",
           max_new_tokens: int = 64, precision: str = "fp32", bf16_matmul: str = "auto"
           ) -> list[str]:
    """Greedy answers to ``prompts`` (each with ``input_``), under ``precision``'s autocast
    and ``bf16_matmul``'s kernels (``train.precision``, ``train.bf16_matmul``)."""
    device = next(model.parameters()).device
    ids = [prompt_ids(tokenizer, p, input_) for p in prompts]  # as the run's training did
    positions = position_limit(model)  # a learned table (GPT-2) cannot index past its rows
    for i, row in enumerate(ids):
        if positions is not None and len(row) + max_new_tokens > positions:
            raise UserError(f"prompt {i + 1} is {len(row)} tokens; with --max-new-tokens "
                            f"{max_new_tokens} it needs {len(row) + max_new_tokens} positions, "
                            f"and the model has {positions}: shorten it or lower "
                            f"--max-new-tokens")
    with forward(precision, device, bf16_products_in_fp32(precision, bf16_matmul, device)):
        return generate(model, tokenizer, ids, max_new_tokens, 8, device)


def main_generate(run_dir: Path, prompts: list[str], input_: str, max_new_tokens: int,
                  base_only: bool, as_json: bool) -> None:
    model, tok, train = load_trained(run_dir, base_only)
    interactive = not prompts
    if interactive:
        print("(one prompt per line; Ctrl-D to end)", file=sys.stderr)
        try:
            prompts = [line.strip() for line in sys.stdin if line.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"the prompts on standard input are not UTF-8 text ({e.reason} at "
                            f"byte {e.start})") from None
        if not prompts:
            raise UserError("no prompts: give them with -p, or one per line on standard input")
    for i, prompt in enumerate(prompts):  # argv and stdin carry a byte UTF-8 cannot decode as
        try:                              # a lone surrogate, which the tokenizer refuses
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"prompt {i + 1} is not UTF-8 text (it holds an undecodable "
                            f"byte)") from None
    for prompt, reply in zip(prompts, answer(model, tok, prompts, input_, max_new_tokens,
                                                train.precision, train.bf16_matmul)):
        if as_json:
            print(json.dumps({"prompt": prompt, "answer": reply}))
        else:
            print(reply if len(prompts) == 1 else f"> {prompt}\n{reply}\n")
