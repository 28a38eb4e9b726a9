"""``train.precision``: fp32 has no autocast at all; bf16-mixed computes the forward passes in
bfloat16 while the LoRA factors, their gradients, AdamW's state and the uploads stay float32;
it runs on both tasks (tiny models here, the real MiniLM and SmolLM2 under ``e2e``); a bad
value is one line, exit 2."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from conftest import assert_config_error
from lora_a2.checks import load_config
from lora_a2.cli import main
from lora_a2.errors import UserError
import lora_a2.precision as precision
from lora_a2.precision import (Bf16ProductsInFp32, autocast, bf16_hardware,
                                 bf16_products_in_fp32, cpu_flags)

TINY_BERT = ["model.name=tiny-random-bert", "data.num_clients=2", "model.max_length=24",
             "strategy.global_rank=4", "strategy.rank_budget=2", "engine.threads=1",
             "data.max_train_examples=60"]


def prepared(data: str, *sets: str):
    from lora_a2.experiment import prepare

    return prepare(load_config(None, [f"data.name={data}", *sets]))


def first_upload(exp):
    """Client 0's upload in round 1 (the local engine's client side, without the bytes)."""
    state = exp.strategy.init_state(exp.runtime.initial_state())
    return exp.strategy.upload(exp.client_context(0), exp.strategy.configure(1, 0, state))


# ---------------------------------------------------------------------- the switch
def test_fp32_is_no_autocast_and_bf16_mixed_is_cpu_bfloat16():
    cpu = torch.device("cpu")
    assert isinstance(autocast("fp32", cpu), contextlib.nullcontext)
    with autocast("bf16-mixed", cpu):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 3), torch.ones(3, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("value", ["fp16", "bf16", "BF16-mixed", "float32"])
def test_a_bad_precision_is_one_line_exit_2(capsys, value):
    assert_config_error(capsys, [f"train.precision={value}"], "train.precision")
    assert main(["run", "--out", "/nonexistent/never", "--set", f"train.precision={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp32, bf16-mixed" in err, err


def test_the_bf16_path_is_read_from_the_cpu_flags():
    base = "processor\t: 0\nflags\t\t: fpu sse avx2 fma"
    assert cpu_flags(base) == {"fpu", "sse", "avx2", "fma"}
    none = bf16_hardware("cpu", base)
    assert none["bf16_native"] is False and "emulated" in none["bf16_path"]
    assert none["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    avx = bf16_hardware("cpu", base + " avx512f avx512_bf16")
    assert avx["bf16_native"] is True and "AVX512-BF16" in avx["bf16_path"]
    amx = bf16_hardware("cpu", base + " avx512_bf16 amx_tile amx_bf16")
    assert amx["bf16_native"] is True and amx["bf16_path"].startswith("CPU AMX-BF16")


def test_a_cuda_card_is_native_bf16_from_compute_capability_8_on():
    # torch.cuda.is_bf16_supported() says True on a V100 (7.0) too, where bfloat16 is emulated
    v100 = bf16_hardware("cuda:0", cuda=("Tesla V100", (7, 0)))
    assert v100["bf16_native"] is False and "emulated" in v100["bf16_path"], v100
    t4 = bf16_hardware("cuda", cuda=("Tesla T4", (7, 5)))
    assert t4["bf16_native"] is False, t4
    for name, cap in [("A100", (8, 0)), ("RTX 3090", (8, 6)), ("H100", (9, 0))]:
        card = bf16_hardware("cuda", cuda=(name, cap))
        assert card["bf16_native"] is True and "native bfloat16" in card["bf16_path"], card
        assert f"{cap[0]}.{cap[1]}" in card["bf16_path"] and "cpu_capability" not in card


# ---------------------------------------------------------------------- which kernels
def test_float32_kernels_compute_a_bfloat16_product_rounded_once():
    """A bfloat16 matrix unit's arithmetic: the exact float32 values of the bfloat16 operands,
    float32 sums, one rounding of the result — computed here independently in float64 (whose
    sums of these products are exact enough that rounding to bfloat16 agrees)."""
    g = torch.Generator().manual_seed(0)
    a, w, b = (torch.randn(*shape, generator=g).to(torch.bfloat16)
               for shape in ((64, 48), (40, 48), (40,)))
    x3 = torch.randn(3, 5, 48, generator=g).to(torch.bfloat16)
    with Bf16ProductsInFp32() as mode:
        lin = torch.nn.functional.linear(a, w, b)           # addmm
        mm = a @ w.T                                         # mm
        bmm = x3 @ x3.transpose(1, 2)                        # bmm
        fp = torch.ones(2, 3) @ torch.ones(3, 2)             # float32: left alone
    assert mode.calls == 3 and fp.dtype == torch.float32
    exact = (a.double() @ w.double().T)
    assert lin.dtype == mm.dtype == bmm.dtype == torch.bfloat16
    assert torch.equal(mm, exact.to(torch.bfloat16))
    assert torch.equal(lin, (exact + b.double()).to(torch.bfloat16))
    assert torch.equal(bmm, (x3.double() @ x3.double().transpose(1, 2)).to(torch.bfloat16))
    # MiniLM's FFN shape under autocast (as a run uses it): bit for bit the float32 product
    # rounded once, where torch's bfloat16 kernels round some sums differently
    big, wbig = (torch.randn(*shape, generator=g) for shape in ((512, 384), (1536, 384)))
    with torch.autocast("cpu", dtype=torch.bfloat16), Bf16ProductsInFp32() as mode:
        out = torch.nn.functional.linear(big, wbig)
    assert mode.calls == 1 and out.dtype == torch.bfloat16
    ref = (big.to(torch.bfloat16).float() @ wbig.to(torch.bfloat16).float().T).to(torch.bfloat16)
    assert torch.equal(out, ref)
    # a product mixing dtypes is left to torch, which rejects it as without the mode
    with Bf16ProductsInFp32() as mode, pytest.raises(RuntimeError):
        a @ torch.ones(48, 3)
    assert mode.calls == 0


def test_the_forward_context_enters_at_with_and_leaves_nothing_behind():
    def active():
        return (torch.is_autocast_enabled("cpu"),
                any(isinstance(m, Bf16ProductsInFp32) for m in _get_current_dispatch_mode_stack()))

    ctx = precision.forward("bf16-mixed", torch.device("cpu"), in_fp32=True)
    assert active() == (False, False)          # made, not entered: nothing is on yet
    with ctx:
        assert active() == (True, True)
    assert active() == (False, False)
    with precision.forward("bf16-mixed", torch.device("cpu"), in_fp32=False):
        assert active() == (True, False)
    with precision.products(True):
        assert active() == (False, True)
    assert isinstance(precision.products(False), contextlib.nullcontext)


def test_which_kernels_bf16_mixed_products_run_on(monkeypatch):
    assert not bf16_products_in_fp32("fp32", "fp32")          # never under fp32
    assert bf16_products_in_fp32("bf16-mixed", "fp32")
    assert not bf16_products_in_fp32("bf16-mixed", "bf16")
    for native in (True, False):
        monkeypatch.setattr(precision, "bf16_hardware",
                            lambda device, native=native: {"bf16_native": native})
        assert bf16_products_in_fp32("bf16-mixed", "auto") is not native
    with pytest.raises(ValueError):
        bf16_products_in_fp32("bf16-mixed", "fp64")


@pytest.mark.parametrize("value", ["float32", "FP32", "native"])
def test_a_bad_bf16_matmul_is_one_line_exit_2(capsys, value):
    assert_config_error(capsys, [f"train.bf16_matmul={value}"], "train.bf16_matmul")
    assert main(["run", "--out", "/nonexistent/never", "--set", f"train.bf16_matmul={value}"]) \
        == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "auto, bf16, fp32" in err, err


def test_float32_kernels_take_over_forward_and_backward_products(synthetic_csv, monkeypatch):
    """Under ``bf16_matmul = fp32`` a training step's products with bfloat16 operands all run
    on float32 kernels, the backward pass's too (its context is separate from the forward's),
    and the loss and upload stay within bfloat16's precision of torch's own kernels."""
    from lora_a2.client import LocalTrainer, ParamGroup, accumulate_gradients

    modes, two_bf16 = [], set()

    class Recorded(Bf16ProductsInFp32):
        def __init__(self):
            super().__init__()
            modes.append(self)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bf16 = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16]
            if func in precision.MATRIX_PRODUCTS and bf16:
                self.seen = getattr(self, "seen", 0) + 1
            if len(bf16) >= 2:  # any op of two bfloat16 operands, to find every product
                two_bf16.add(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

    monkeypatch.setattr(precision, "Bf16ProductsInFp32", Recorded)
    ups = {}
    for kernels in ("bf16", "fp32"):
        exp = prepared(f"csv:{synthetic_csv}", *TINY_BERT, "strategy.name=fl-lora",
                       "train.precision=bf16-mixed", f"train.bf16_matmul={kernels}")
        assert exp.runtime.bf16_in_fp32 is (kernels == "fp32")
        modes.clear()
        rt = exp.runtime
        names = rt.layout.group_names(["A", "B"])
        LocalTrainer(rt, [ParamGroup(names, 1e-3)], 0.0).run(
            exp.enc_train, exp.client_train[0], 1, 8, torch.Generator().manual_seed(0),
            max_steps=1)
        accumulate_gradients(rt, exp.enc_train, exp.client_train[0], names, 8,
                             torch.Generator().manual_seed(0), batches=1)  # LoRA-A2's probe
        if kernels == "bf16":
            assert modes == []
        else:   # each pass, a forward and a backward context, each taking over every product
            assert len(modes) == 4, modes
            assert all(m.calls > 0 and m.calls == m.seen for m in modes)
            # no matrix product outside the list the mode takes over (a product kernel the
            # list misses would run in emulated bfloat16 unseen by either count above; fused
            # attention kernels are left to torch on purpose, see precision.MATRIX_PRODUCTS)
            products = {f for f in two_bf16 if any(
                word in f.__name__ for word in ("mm", "mv", "dot", "matmul", "linear", "einsum",
                                                "conv"))}
            assert products <= set(precision.MATRIX_PRODUCTS), products
        ups[kernels] = first_upload(exp)
    a, b = ups["bf16"].values.double(), ups["fp32"].values.double()
    assert float((a - b).norm() / a.norm()) < 0.1
    assert ups["fp32"].meta["loss"] == pytest.approx(ups["bf16"].meta["loss"], abs=0.02)


# ---------------------------------------------------------------------- what stays float32
def test_bf16_mixed_forward_in_bfloat16_factors_optimiser_and_upload_in_float32(synthetic_csv,
                                                                                monkeypatch):
    from lora_a2.client import LocalTrainer, ParamGroup

    exp = prepared(f"csv:{synthetic_csv}", *TINY_BERT, "train.precision=bf16-mixed")
    rt = exp.runtime
    seen = []
    loss_of = type(exp.task).loss

    def spy(self, model, batch):
        seen.append((torch.is_autocast_enabled("cpu"),
                     model(input_ids=batch[0], attention_mask=batch[1]).logits.dtype))
        return loss_of(self, model, batch)

    monkeypatch.setattr(type(exp.task), "loss", spy)
    names = rt.layout.group_names(["A", "B"])
    trainer = LocalTrainer(rt, [ParamGroup(names, 1e-3)], weight_decay=0.01)
    trainer.run(exp.enc_train, exp.client_train[0], 1, 8, torch.Generator().manual_seed(0),
                max_steps=2)
    assert seen == [(True, torch.bfloat16)] * 2  # every step's forward pass in bfloat16
    for n in names:
        p = rt.params[n]
        assert p.dtype == torch.float32
        assert {v.dtype for v in trainer.opt.state[p].values() if v.dim()} == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")  # the context did not leak
    upload = first_upload(exp)
    assert upload.values.dtype == torch.float32


def test_bf16_mixed_changes_the_upload_a_little(synthetic_csv):
    """The switch does something (the upload differs from fp32's) and not much (the loss and
    the upload agree to bfloat16's precision)."""
    ups = {}
    for p in ("fp32", "bf16-mixed"):
        exp = prepared(f"csv:{synthetic_csv}", *TINY_BERT, "strategy.name=fl-lora",
                       f"train.precision={p}")
        ups[p] = first_upload(exp)
    a, b = ups["fp32"].values.double(), ups["bf16-mixed"].values.double()
    assert not torch.equal(a, b)
    assert float((a - b).norm() / a.norm()) < 0.1
    assert ups["bf16-mixed"].meta["loss"] == pytest.approx(ups["fp32"].meta["loss"], abs=0.02)


# ---------------------------------------------------------------------- whole runs
def run_pair(tmp_path: Path, sets: list[str]) -> dict[str, dict]:
    """The same run in fp32 and bf16-mixed: each one's summary.json and its first metrics
    line."""
    out = {}
    for p in ("fp32", "bf16-mixed"):
        d = tmp_path / p
        args = ["run", "--quiet", "--out", str(d), "--set", f"train.precision={p}"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 0
        summary = json.loads((d / "summary.json").read_text())
        adapter = load_file(d / "adapter" / "adapter_model.safetensors")
        assert {t.dtype for t in adapter.values()} == {torch.float32}  # exported factors
        out[p] = summary
    for p, s in out.items():
        assert s["precision"] == p and s["precision_detail"].startswith(p)
        assert isinstance(s["bf16_native"], bool) and s["bf16_path"]
        # which kernels ran the products: float32 ones for bf16-mixed where bfloat16 has no units
        assert s["bf16_matmul"] == "auto"
        assert s["bf16_products_in_fp32"] is (p == "bf16-mixed" and not s["bf16_native"])
        assert ("float32 kernels" in s["precision_detail"]) is s["bf16_products_in_fp32"]
    return out


def test_tiny_bert_classification_runs_in_bf16_mixed(tmp_path, synthetic_csv, capsys):
    s = run_pair(tmp_path, [f"data.name=csv:{synthetic_csv}", *TINY_BERT, "train.rounds=2"])
    assert "precision  bf16-mixed: bfloat16 autocast" in capsys.readouterr().out
    fp, bf = s["fp32"], s["bf16-mixed"]
    assert fp["final_loss"] != bf["final_loss"]
    assert bf["final_loss"] == pytest.approx(fp["final_loss"], abs=0.05)
    assert bf["total_upload_bytes"] >= 4 * bf["total_upload_params"]  # float32 values


def test_tiny_llama_causal_lm_runs_in_bf16_mixed(tmp_path, monkeypatch, capsys):
    import lora_a2.generate
    from test_causal_lm import LLAMA, instruction_rows

    data = tmp_path / "instr.json"
    data.write_text(json.dumps(instruction_rows(48)))
    s = run_pair(tmp_path, [f"data.name=json:{data}", *LLAMA, "data.num_clients=2",
                            "train.rounds=1"])
    fp, bf = s["fp32"], s["bf16-mixed"]
    assert fp["final_loss"] != bf["final_loss"]
    assert bf["final_loss"] == pytest.approx(fp["final_loss"], rel=0.02)
    # evaluation too: in bf16 (not the same number) and close to float32
    assert bf["initial_loss"] != fp["initial_loss"]
    assert bf["initial_loss"] == pytest.approx(fp["initial_loss"], rel=0.02)
    # lora-a2 generate answers in the run's precision, as the run's own evaluation did
    seen = {}
    real = lora_a2.generate.generate

    def generate(*args, **kwargs):
        in_fp32 = any(isinstance(m, Bf16ProductsInFp32) for m in _get_current_dispatch_mode_stack())
        seen[run] = (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                     in_fp32)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_a2.generate, "generate", generate)
    for run in ("fp32", "bf16-mixed"):
        assert main(["generate", str(tmp_path / run), "-p", "Name a fruit.",
                     "--max-new-tokens", "3"]) == 0
    # ... and on the run's kernels (train.bf16_matmul = auto)
    assert seen == {"fp32": (False, False),
                    "bf16-mixed": (torch.bfloat16, bf.get("bf16_products_in_fp32"))}
    assert capsys.readouterr().out.count("\n") >= 2  # an answer line each


@pytest.mark.e2e
def test_minilm_runs_in_bf16_mixed(tmp_path):
    """The real MiniLM, one small FL+LoRA round in each precision (kept small: bfloat16 is
    emulated, ≈ 10× slower than float32, on CPUs without AVX512-BF16)."""
    s = run_pair(tmp_path, ["model.name=minilm", "data.name=bbc-news", "data.num_clients=2",
                            "data.max_train_examples=32", "data.max_test_examples=16",
                            "data.min_examples_per_client=4", "model.max_length=32",
                            "strategy.name=fl-lora", "strategy.rank_budget=2",
                            "train.rounds=1", "train.batch_size=8", "strategy.lr=1e-3"])
    fp, bf = s["fp32"], s["bf16-mixed"]
    assert fp["final_loss"] != bf["final_loss"]
    assert bf["final_loss"] == pytest.approx(fp["final_loss"], abs=0.02), (fp, bf)


@pytest.mark.e2e
def test_smollm2_runs_in_bf16_mixed(tmp_path):
    """The real SmolLM2 (float32 base weights under bfloat16 autocast), one tiny round."""
    pytest.importorskip("gguf")
    from lora_a2.models import smollm2_gguf

    try:
        smollm2_gguf()
    except UserError as e:
        pytest.skip(str(e))
    s = run_pair(tmp_path, ["model.name=smollm2", "data.name=bbc-headlines",
                            "data.num_clients=1", "data.max_train_examples=2",
                            "data.max_test_examples=2", "data.min_examples_per_client=1",
                            "train.rounds=1", "train.batch_size=2", "model.max_length=112",
                            "model.dtype=float32", "task.generate_examples=0",
                            "strategy.name=fl-lora", "strategy.rank_budget=2",
                            "model.target_modules=['q_proj','v_proj']", "strategy.lr=1e-3"])
    fp, bf = s["fp32"], s["bf16-mixed"]
    assert fp["final_loss"] != bf["final_loss"]
    assert bf["final_loss"] == pytest.approx(fp["final_loss"], rel=0.03), (fp, bf)
    assert bf["initial_loss"] == pytest.approx(fp["initial_loss"], rel=0.03), (fp, bf)


def test_the_bf16_kernels_benchmark_runs_and_names_a_bad_model_in_one_line(capsys, monkeypatch):
    """``benchmarks/bf16_kernels.py``: the comparison on the tiny model, and a model that cannot
    be loaded is one line, exit 2."""
    spec = importlib.util.spec_from_file_location(
        "bf16_kernels", Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", "tiny-random-bert"]) == 0
    out = capsys.readouterr().out
    assert "bf16-mixed/fp32  vs bf16-mixed/bf16" in out and "one evaluation forward pass" in out

    def unloadable(*args, **kwargs):
        raise UserError("could not load model 'nope'")

    monkeypatch.setattr(bench, "limit_experiment", unloadable)
    assert bench.main(["--model", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: could not load model 'nope'", err
