"""The one model of a process with its federated parameters, and the layout both sides share.

The base model is loaded once per process (:class:`ModelRuntime`); clients and the evaluator
take turns by loading a global state into it *in place* (:meth:`ModelRuntime.load`).

Federated parameter names (the keys of every global state):
- ``<module>.A`` (r × d_in) and ``<module>.B`` (d_out × r) for every LoRA target module;
- ``head.<param>`` for the classifier head when it is trained (``model.head = "trained"``);
- ``full.<param>`` for every model parameter under ``fedavg-full`` (no LoRA);
- ``merged.<module>`` (d_out × d_in): a dense additive delta on a target module's frozen base
  weight, for methods that merge into the base (FLoRA, FedEx-LoRA's residual) or keep a
  full-rank global delta (FlexLoRA). Loading one sets W = W0 + Δ on that module (:meth:`ModelRuntime.set_weight_delta`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import UserError
from .models import LoraModule, find_target_modules
from .precision import bf16_products_in_fp32, forward, products
from .report import atomic_write_text

if TYPE_CHECKING:  # annotations only: tasks build on the runtime, not the reverse
    from .tasks.base import LearningTask

GROUPS = ("A", "B", "head", "full", "merged")


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the federated parameters, in a fixed order both sides derive."""

    modules: tuple[LoraModule, ...]
    rank: int
    head: tuple[tuple[str, tuple[int, ...]], ...]
    full: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    def names(self, group: str) -> list[str]:
        if group == "A":
            return [f"{m.name}.A" for m in self.modules]
        if group == "B":
            return [f"{m.name}.B" for m in self.modules]
        if group == "head":
            return [n for n, _ in self.head]
        if group == "full":
            return [n for n, _ in self.full]
        if group == "merged":
            return [f"merged.{m.name}" for m in self.modules]
        raise KeyError(group)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes()[name]

    def shapes(self, names: list[str]) -> list[tuple[int, ...]]:
        table = self._shapes()
        return [table[n] for n in names]

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        table: dict[str, tuple[int, ...]] = {}
        for m in self.modules:
            table[f"{m.name}.A"] = (self.rank, m.d_in)
            table[f"{m.name}.B"] = (m.d_out, self.rank)
            table[f"merged.{m.name}"] = (m.d_out, m.d_in)
        table.update(dict(self.head))
        table.update(dict(self.full))
        return table

    def group_names(self, groups: list[str]) -> list[str]:
        return [n for g in groups for n in self.names(g)]

    def size(self, groups: list[str]) -> int:
        return sum(math.prod(self.shape(n)) for n in self.group_names(groups))


class ModelRuntime:
    """The process's single model: base weights loaded once, LoRA (rank ``lora_rank``) attached.

    Parameters
    ----------
    cfg : model options.
    num_labels : classes of the task.
    lora_rank : rank of the attached adapter; ``None`` for full fine-tuning (no LoRA).
    seed : seeds the random head and A's init, so every process builds the same start.
    device : where the model runs.
    task : the run's :class:`~lora_a2.tasks.LearningTask` (loads the base model, gives the loss
        and PEFT's task type).
    base : ``task.load_model(num_labels, seed)``'s result when already loaded (the experiment
        encodes the data with its tokenizer before the rank is known); None: load it here.
    precision : ``train.precision``: ``fp32`` or ``bf16-mixed`` (see :meth:`autocast`).
    bf16_matmul : ``train.bf16_matmul``: which kernels compute ``bf16-mixed``'s matrix products
        (:func:`lora_a2.precision.bf16_products_in_fp32`).
    """

    def __init__(self, cfg: ModelConfig, num_labels: int, lora_rank: int | None, seed: int,
                 device: torch.device, task: LearningTask,
                 base: tuple[nn.Module, Any, str | None] | None = None,
                 precision: str = "fp32", bf16_matmul: str = "auto") -> None:
        self.cfg = cfg
        self.task = task
        self.device = device
        self.precision = precision
        self.bf16_in_fp32 = bf16_products_in_fp32(precision, bf16_matmul, device)
        self.num_labels = num_labels
        base, self.tokenizer, self.source = base or task.load_model(num_labels, seed)
        self._tiny_base = ({k: v.clone() for k, v in base.state_dict().items()}, base.config,
                           type(base)) if self.source is None else None
        if cfg.gradient_checkpointing:
            if not getattr(base, "supports_gradient_checkpointing", False):
                raise UserError(f"model '{cfg.name}' does not support "
                                f"model.gradient_checkpointing")
            # non-reentrant: gradients reach the LoRA factors although every base weight and
            # the inputs are frozen (the reentrant variant would drop them). Its recomputed
            # forward runs inside the backward pass: under the forward's autocast state (which
            # checkpoint restores) and :meth:`backward`'s kernels for bf16-mixed's products
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(base.config, "use_cache", None):
            base.config.use_cache = False  # a KV cache is for generation, not training
        self.head_attr = task.head_attr(base)
        #: the transformers model itself: ``model`` wraps it with PEFT when there is LoRA (its
        #: ``generate`` calls this one's forward directly)
        self.hf_model = base
        self.params: dict[str, nn.Parameter] = {}
        self._base_weights: dict[str, tuple[nn.Parameter, Tensor]] = {}
        self._lora_layers: list[nn.Module] = []
        self.default_scaling = 0.0
        head: list[tuple[str, tuple[int, ...]]] = []
        if lora_rank is None:
            self.model = base
            modules: list[LoraModule] = []
            full = [(f"full.{n}", tuple(p.shape)) for n, p in base.named_parameters()]
            self.params = {f"full.{n}": p for n, p in base.named_parameters()}
            rank = 0
        else:
            from peft import LoraConfig, get_peft_model

            modules = find_target_modules(base, list(cfg.target_modules) or None)
            widest = max(max(m.d_in, m.d_out) for m in modules)
            if lora_rank > widest:  # no layer has a side that long: such a rank adds nothing
                # but memory (a rank of 10^20 was a traceback from the allocator)
                raise UserError(f"config key 'strategy.global_rank': {lora_rank} exceeds every "
                                f"side of every LoRA layer of '{cfg.name}' (at most {widest})")
            self.peft_config = LoraConfig(
                r=lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=[m.name for m in modules], task_type=task.peft_task_type)
            self.model = get_peft_model(base, self.peft_config)
            inner = self.model.base_model.model
            for m in modules:
                layer = inner.get_submodule(m.name)
                self.params[f"{m.name}.A"] = layer.lora_A["default"].weight
                self.params[f"{m.name}.B"] = layer.lora_B["default"].weight
                self._lora_layers.append(layer)
            self.default_scaling = float(self._lora_layers[0].scaling["default"]) \
                if self._lora_layers else 0.0
            head_mod = getattr(inner, self.head_attr) if self.head_attr else None
            head_params = head_mod.modules_to_save["default"] if hasattr(head_mod, "modules_to_save") \
                else head_mod
            for n, p in head_params.named_parameters() if head_params is not None else ():
                self.params[f"head.{n}"] = p
                if cfg.head == "trained":
                    head.append((f"head.{n}", tuple(p.shape)))
            full = []
            rank = lora_rank
            self._init_lora(seed)
        self.layout = ParamLayout(tuple(modules), rank, tuple(head), tuple(full))
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.to(device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward pass of this model runs under (training, LoRA-A2's probe,
        evaluation): bfloat16 autocast on the model's device under ``bf16-mixed`` (with its
        products' kernels, ``train.bf16_matmul``), a null context under ``fp32``
        (:mod:`lora_a2.precision`). Backward passes run outside it, under :meth:`backward`."""
        return forward(self.precision, self.device, self.bf16_in_fp32)

    def backward(self) -> contextlib.AbstractContextManager:
        """The context every backward pass runs under: the kernels ``train.bf16_matmul`` picked
        for ``bf16-mixed``'s matrix products (their operands are bfloat16 going back too); a
        null context otherwise."""
        return products(self.bf16_in_fp32)

    # ------------------------------------------------------------------ state in and out
    def _init_lora(self, seed: int) -> None:
        """B = 0, A ~ N(0, σ²) (docs/ALGORITHM.md §1.2), drawn in module order from ``seed``."""
        gen = torch.Generator().manual_seed(seed + 7919)
        with torch.no_grad():
            for name, p in self.params.items():
                if name.endswith(".B"):
                    p.zero_()
                elif name.endswith(".A"):
                    d_in = p.shape[1]
                    std = self.cfg.init_std or 1.0 / math.sqrt(3.0 * d_in)
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def initial_state(self) -> dict[str, Tensor]:
        """The starting global state: every federated parameter, on the CPU."""
        names = self.layout.group_names(self.federated_groups())
        return self.snapshot(names)

    def federated_groups(self) -> list[str]:
        if self.layout.full:
            return ["full"]
        return ["A", "B"] + (["head"] if self.layout.head else [])

    def snapshot(self, names: list[str]) -> dict[str, Tensor]:
        """Copies (CPU) of the named parameters' current values."""
        return {n: self.params[n].detach().to("cpu", copy=True) for n in names}

    @torch.no_grad()
    def load(self, tensors: dict[str, Tensor]) -> None:
        """Write values into the model in place (no new model, no reallocation).

        ``merged.<module>`` entries set that module's additive base-weight delta
        (:meth:`set_weight_delta`); every other name is a federated parameter.
        """
        merged = {n[len("merged."):]: t for n, t in tensors.items() if n.startswith("merged.")}
        for n, t in tensors.items():
            if not n.startswith("merged."):
                self.params[n].copy_(t.to(self.params[n].dtype))
        if merged:
            self.set_weight_delta(merged)

    @torch.no_grad()
    def set_weight_delta(self, deltas: dict[str, Tensor] | None) -> None:
        """Set each target module's frozen base weight to W0 + ``deltas[module]`` (d_out × d_in).

        Reversible: W0 is kept (copied on first use) and every call starts from it, so deltas
        never accumulate; a module absent from ``deltas`` (or ``deltas=None``) gets W0 back.
        The delta is added in float32 once, so the forward pass costs nothing extra.
        """
        deltas = deltas or {}
        inner = self.model.base_model.model
        for m in self.layout.modules:
            if m.name not in deltas and m.name not in self._base_weights:
                continue  # never changed: already W0
            if m.name not in self._base_weights:
                w = inner.get_submodule(m.name).get_base_layer().weight
                self._base_weights[m.name] = (w, w.detach().clone())
            w, w0 = self._base_weights[m.name]
            if m.name in deltas:  # the sum in float32, rounded once to the base's dtype
                w.copy_(w0.float() + deltas[m.name].to(w0.device, torch.float32))
            else:
                w.copy_(w0)

    @torch.no_grad()
    def weight_deltas(self) -> dict[str, Tensor]:
        """The current non-zero base-weight deltas W − W0 per module (float32 CPU copies: on a
        bfloat16 base the difference of the two rounded weights is exact in float32, so
        W0 + it, rounded once, gives W back bit for bit — a bfloat16 difference did not)."""
        out = {}
        for name, (w, w0) in self._base_weights.items():
            d = (w.detach().float() - w0.float()).to("cpu")
            if bool(d.any()):
                out[name] = d
        return out

    def set_lora_scaling(self, scaling: float | None) -> None:
        """LoRA scaling s of every target module (ΔW = s·B·A); None restores lora_alpha / rank.

        Methods whose clients train at their own scaling (FlexLoRA: α / r_k; FLoRA: 2) set it
        around local training, so the training dynamics are those of a rank-r_k LoRA exactly
        (folding the ratio into B instead would change AdamW's effective step size).
        """
        value = self.default_scaling if scaling is None else float(scaling)
        for layer in self._lora_layers:
            layer.scaling["default"] = value

    # ------------------------------------------------------------------ export
    def export(self, out_dir: Path) -> Path:
        """Save the model's current adapter in PEFT's format (or the full model, no LoRA).

        ``PeftModel.from_pretrained(base, out_dir)`` restores it; the classifier head is saved
        with it (``modules_to_save``) because a fresh base model would draw another random head.
        For a model built in code (``tiny-random-bert``, ``tiny-random-llama``) the random base
        is saved beside it in ``base_model/``.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.layout.full:
            self.model.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)
            return out_dir
        base_ref = self.source
        if self._tiny_base is not None:
            base_ref = str((out_dir.parent / "base_model").resolve())
            self._save_tiny_base(Path(base_ref))
        self.model.peft_config["default"].base_model_name_or_path = base_ref
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        info = {"base_model": base_ref, "model_name": self.cfg.name, "task": self.task.name,
                **self.task.describe(self)}
        deltas = self.weight_deltas()
        if deltas:
            # FLoRA / FlexLoRA: the global model is base + these deltas (+ the adapter).
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in deltas.items()},
                      str(out_dir / "merged_delta.safetensors"))
            info["merged_delta"] = "merged_delta.safetensors: add to each module's base weight"
        # last, and atomically: its presence marks a complete export (lora-a2 generate)
        atomic_write_text(out_dir / "lora_a2.json", json.dumps(info, indent=2))
        return out_dir

    def _save_tiny_base(self, path: Path) -> None:
        state, config, cls = self._tiny_base
        base = cls(config)
        base.load_state_dict(state)
        # in the dtype the run trained it in (load_state_dict keeps the new model's float32)
        base.to(next(v.dtype for v in state.values() if v.is_floating_point())) \
            .save_pretrained(path)
        self.tokenizer.save_pretrained(path)
