"""convert on Hugging Face models built from small configs (nothing is downloaded).

GPT-2 stores its projections as transformers' ``Conv1D`` (a Linear with an (in, out)
weight); Llama uses nn.Linear. Tolerances: a BF16-backend conversion against the float32
original >= 40 dB (operands rounded to bf16 only); training: the loss after 6 FP8 steps on
one batch is below the first step's.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fp8lab
from fp8lab import FP8Options
from fp8lab.gemm.backends.select import DeviceFacts, TEFacts
from fp8lab.layers.convert_hf import Conv1DLinear
from tests.helpers import sqnr_db

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

EMULATED = FP8Options(fallback="emulated")
VOCAB = 128


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


MODELS = {"gpt2": gpt2, "llama": llama}


def _linear_like(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


@pytest.mark.parametrize("name", MODELS)
def test_every_linear_like_layer_is_fp8_or_listed_with_a_reason(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    before = _linear_like(model)
    fp8lab.convert(model, fp8=EMULATED)
    rows = {row.name: row for row in fp8lab.describe(model)}
    assert set(before) <= set(rows)  # every linear-like layer has a row
    for layer in before:
        row = rows[layer]
        assert row.precision == "fp8" or row.reason, row
    assert rows["lm_head"].precision == "bf16" and "policy" in rows["lm_head"].reason
    assert [n for n in before if rows[n].precision != "fp8"] == ["lm_head"]  # everything else runs FP8
    assert not _linear_like(model)  # nothing left as torch or Conv1D
    if name == "gpt2":
        assert all(isinstance(model.get_submodule(n), Conv1DLinear) for n in before if n != "lm_head")
        assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keeps_the_original_keys_and_loads_weights_only(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    original = {k: v.shape for k, v in model.state_dict().items()}
    fp8lab.convert(model, fp8=EMULATED)
    state = model.state_dict()
    added = set(state) - set(original)
    assert set(original) <= set(state) and all(state[k].shape == original[k] for k in original)
    assert added and all(".fp8_state." in k for k in added)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    torch.manual_seed(1)  # different weights, to see that loading replaces them
    fresh = fp8lab.convert(MODELS[name]().eval(), fp8=EMULATED)
    fresh.load_state_dict(loaded)  # strict
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_conv1d_conversion_computes_the_same_function():
    torch.manual_seed(0)
    model = gpt2().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        fp8lab.convert(model, fp8=FP8Options(backend="bf16"))
        out = model(ids).logits
    assert sqnr_db(ref, out) > 40.0


@pytest.mark.parametrize("name", MODELS)
def test_a_few_fp8_steps_lower_the_loss(one_thread, name):
    torch.manual_seed(0)
    model = fp8lab.convert(MODELS[name](), fp8=EMULATED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, 32))
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        fp8lab.update_scales(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(m.fp8_state.scale.ne(1.0).any() for m in model.modules() if isinstance(m, Conv1DLinear))


class _OwnForward(Conv1D):
    def forward(self, x):
        return super().forward(x) * 2


class _TensorParallelLinear(nn.Module):  # a library's own linear-like layer
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return x @ self.weight.t()


def test_layers_left_as_they_were_are_listed_with_their_reason():
    model = nn.ModuleDict(
        {
            "own": _OwnForward(16, 16),
            "tp": _TensorParallelLinear(),
            "emb": nn.Embedding(10, 16),
            "mha": nn.MultiheadAttention(16, 2),
            "conv": Conv1D(16, 16),
        }
    )
    fp8lab.convert(model, fp8=EMULATED)
    rows = {row.name: row for row in fp8lab.describe(model)}
    assert "overrides transformers' Conv1D.forward" in rows["own"].reason and rows["own"].precision == "torch"
    assert "_TensorParallelLinear is not a layer fp8lab converts" in rows["tp"].reason
    assert "in_proj_weight" in rows["mha"].reason and "out_proj" in rows["mha.out_proj"].reason
    assert rows["conv"].precision == "fp8" and "emb" not in rows


def test_conv1d_layer_never_plans_transformer_engine():
    layer = Conv1DLinear.from_conv1d(Conv1D(64, 32), FP8Options())
    plan = layer.plan_for(DeviceFacts("cuda", (9, 0), "H100"), TEFacts("2.0"))
    assert plan.backend == "scaled_mm" and "Conv1D (in, out) layout" in plan.reason
    plain = fp8lab.Linear(32, 64)
    assert plain.plan_for(DeviceFacts("cuda", (9, 0), "H100"), TEFacts("2.0")).backend == "te"
