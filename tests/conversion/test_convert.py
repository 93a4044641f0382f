"""convert() on real models: exact outputs, close gradients, fewer saved bytes, truthful report."""

from __future__ import annotations

import copy
import pickle
import time
import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_approxbp import ProbeError, convert
from lightning_approxbp.conversion import engine
from lightning_approxbp.conversion.probe import output_tensors
from lightning_approxbp.saved_tensors import SavedTensorCounter
from tests.conversion.models import CASES, Case, PreLNBlock
from tests.tolerances import (
    CONVERTED_LOSS_MAX_RELATIVE_BF16,
    CONVERTED_OUTPUT_MAX_RELATIVE_FP32,
    EXACT_GRADS_MAX_RELATIVE_FP32,
    IDENTICAL,
    NORM_FROM_OUTPUT_GRADS_MAX_RELATIVE,
    REPORTED_ERROR_FP32,
    REPORTED_ERROR_FP64_WITH_FP32_NORMS,
    ROUNDING,
)


def _grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _saved_bytes(case: Case, model: nn.Module) -> int:
    with SavedTensorCounter(exclude=model.parameters()) as counter:
        case.call(model)
    return counter.stats.activation_bytes


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def test_output_equal_bytes_lower_report_truthful(case: Case) -> None:
    model = case.build().train()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    trainable = [(name, p.requires_grad) for name, p in model.named_parameters()]

    report = convert(model, case.batch)

    assert report.converted and report.max_error is not None and report.max_error < REPORTED_ERROR_FP32
    # the report's byte counts are what an independent counter sees on the same batch
    assert report.bytes_before == _saved_bytes(case, reference)
    assert report.bytes_after == _saved_bytes(case, model)
    assert report.bytes_after < report.bytes_before
    for ours, theirs in zip(output_tensors(case.call(model)), output_tensors(case.call(reference)), strict=True):
        assert _relative_error(ours, theirs) < CONVERTED_OUTPUT_MAX_RELATIVE_FP32
    assert list(model.state_dict()) == keys
    assert [(name, p.requires_grad) for name, p in model.named_parameters()] == trainable
    reference.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(reference.state_dict(), strict=True)
    assert str(report).startswith("ApproxBP conversion (probe: example_input)")
    assert report.to_dict()["bytes_after"] == report.bytes_after


def test_converted_models_pickle_and_deepcopy_with_the_same_outputs(case: Case) -> None:
    model = case.build().train()
    convert(model, case.batch)
    torch.manual_seed(0)
    expected = output_tensors(case.call(model))
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.manual_seed(0)
        for ours, theirs in zip(output_tensors(case.call(copied)), expected, strict=True):
            torch.testing.assert_close(ours, theirs, **IDENTICAL)
        assert str(copied) == str(model)


@pytest.mark.parametrize("name", ["llama", "llama_tied", "peft_llama", "gpt2", "vit", "gemma", "bert"])
def test_norm_conversion_alone_is_exact_including_one_optimizer_step(name: str) -> None:
    case = CASES[name]
    model = case.build().train()
    reference = copy.deepcopy(model)
    report = convert(model, case.batch, activations=False)
    assert report.converted
    for m in (model, reference):
        case.forward_loss(m).backward()
    assert _relative_error(_grads(model), _grads(reference)) < NORM_FROM_OUTPUT_GRADS_MAX_RELATIVE
    for m in (model, reference):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    for (name_a, a), (name_b, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert name_a == name_b
        torch.testing.assert_close(a, b, **ROUNDING[torch.float32])


def test_strategies_per_architecture() -> None:
    llama = CASES["llama"].build()
    report = convert(llama, CASES["llama"].batch)
    norms = [row for row in report.rows if row.kind == "LlamaRMSNorm"]
    assert len(norms) == 5 and all("merge" in row.strategy for row in norms)
    assert report.row("lm_head").strategy == "applies affine of model.norm"
    assert report.row("model.layers.0.mlp").strategy == "fused gated MLP (silu)"
    assert "model.layers.0.mlp.act_fn" not in {row.fqn for row in report.rows}  # exact inside the fused MLP
    unfused = convert(CASES["llama"].build(), CASES["llama"].batch, gated_mlp=False)
    assert unfused.row("model.layers.0.mlp.act_fn").strategy == "step silu 2-bit fitted"

    bert = CASES["bert"].build()
    report = convert(bert, CASES["bert"].batch)
    post_ln = report.row("bert.encoder.layer.0.output.LayerNorm")
    assert post_ln.action == "converted" and "keep" in post_ln.strategy and "add" in post_ln.reason
    assert "output=input" in post_ln.strategy  # the fp32 residual stream keeps its dtype under autocast

    gpt2 = CASES["gpt2"].build()
    report = convert(gpt2, CASES["gpt2"].batch)
    assert report.row("transformer.h.0.attn.c_attn").action == "converted"
    assert report.row("transformer.h.0.mlp.act").strategy == "step gelu_tanh 2-bit fitted"


def test_tied_lm_head_stays_tied() -> None:
    case = CASES["llama_tied"]
    model = case.build()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    convert(model, case.batch)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    case.forward_loss(model).backward()
    assert model.lm_head.weight.grad is not None


def test_pretrained_minilm_skips_the_norm_with_zero_weight() -> None:
    case = CASES["minilm"]
    model = case.build()
    report = convert(model, case.batch)
    last = report.row("encoder.layer.5.output.LayerNorm")
    # its output is returned to the caller, so it cannot be merged; its weight has ~0 entries
    assert last.action == "skipped" and "returned" in last.reason and "min |weight|" in last.reason
    assert "keep" in report.row("encoder.layer.0.output.LayerNorm").strategy


def test_second_conversion_changes_nothing() -> None:
    case = CASES["gpt2"]
    model = case.build()
    convert(model, case.batch)
    text = repr(model)
    report = convert(model, case.batch)
    assert not report.changed and repr(model) == text
    assert {row.action for row in report.rows} == {"unchanged"}


def test_verify_failure_leaves_the_model_unconverted(monkeypatch: pytest.MonkeyPatch) -> None:
    # The conversion of this block is exact, so a mismatch has to be simulated.
    monkeypatch.setattr(engine, "max_relative_error", lambda *_: (0.5, 0))
    case = CASES["pre_ln_block"]
    model = case.build().train()
    text = repr(model)
    with pytest.raises(RuntimeError, match=r"left unconverted.*Converted modules were: norm, fc1, act"):
        convert(model, case.batch)
    assert repr(model) == text


def test_nothing_to_convert_warns_and_is_a_no_op() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="nothing to convert"):
        report = convert(model, torch.randn(2, 4))
    assert not report.changed
    assert report.row("1").action == "skipped" and "matches none" in report.row("1").reason


@pytest.mark.parametrize("name", ["llama", "gemma"])  # Gemma: weight 0 means scale 1 + 0
def test_without_probe_norms_keep_their_affine(name: str) -> None:
    model = CASES[name].build()
    report = convert(model)
    assert report.bytes_before is None and report.notes and "no probe batch" in report.notes[0]
    assert "keep" in report.row("model.norm").strategy, report.row("model.norm").reason
    assert report.row("model.layers.0.mlp").strategy.startswith("fused gated MLP")  # needs no probe


def test_small_weight_is_never_kept() -> None:
    model = CASES["llama"].build()
    with torch.no_grad():
        model.model.norm.weight[3] = 0.0
    report = convert(model)
    assert report.row("model.norm").action == "skipped"
    assert "min |weight| = 0.0e+00" in report.row("model.norm").reason


@pytest.mark.parametrize(("affine", "expected"), [("merge", "skipped"), ("keep", "converted")])
def test_forced_affine_strategy(affine: str, expected: str) -> None:
    case = CASES["bert"]
    model = case.build()
    report = convert(model, case.batch, affine=affine)
    assert report.row("bert.encoder.layer.0.output.LayerNorm").action == expected
    llama_report = convert(CASES["llama"].build(), CASES["llama"].batch, affine=affine)
    assert affine in llama_report.row("model.norm").strategy


def test_filter_limits_the_conversion() -> None:
    case = CASES["llama"]
    model = case.build()
    report = convert(model, case.batch, filter=lambda module, fqn: "layers.0." in fqn)
    assert {row.fqn for row in report.rows if "Norm" in row.kind or "MLP" in row.kind} == {
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.0.mlp",
    }


def test_paper_table_skips_activations_it_has_no_table_for() -> None:
    case = CASES["gpt2"]
    with pytest.warns(UserWarning, match="nothing to convert"):
        report = convert(case.build(), case.batch, table="paper", norms=False)
    row = report.row("transformer.h.0.mlp.act")
    assert row.action == "skipped" and "table='fitted'" in row.reason


class _SharedLinear(nn.Module):
    """The same linear reads the norm output and another tensor: its affine cannot move there."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x)) + self.proj(x)


class _TransposedUse(nn.Module):
    """A linear over the token axis of the norm output: the affine does not commute with it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(self.norm(x).transpose(-1, -2))


class _SliceUse(nn.Module):
    """A classifier on the first token: a view, feature axis intact, so the merge applies."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize(
    ("module", "strategy"), [(_SharedLinear, "keep"), (_TransposedUse, "keep"), (_SliceUse, "merge"), (PreLNBlock, "merge")]
)
def test_consumer_tracing(module: type[nn.Module], strategy: str) -> None:
    model = module()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 8) if module is not PreLNBlock else torch.randn(2, 6, 32)
    expected = model(x)
    report = convert(model, x)
    assert strategy in report.row("norm").strategy
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("name", ["llama", "vit", "gpt2", "bert"])
def test_bf16_autocast_output_close_and_bytes_lower(name: str) -> None:
    case = CASES[name]
    model = case.build().train()
    reference = copy.deepcopy(model)
    convert(model, case.batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, after = _saved_bytes(case, reference), _saved_bytes(case, model)
        ours, theirs = case.forward_loss(model), case.forward_loss(reference)
    assert after < before
    assert _relative_error(ours, theirs) < CONVERTED_LOSS_MAX_RELATIVE_BF16
    ours.backward()


def test_bf16_model_and_gradient_checkpointing() -> None:
    """Recomputation under checkpointing gives the very gradients of the converted model without it."""
    case = CASES["llama"]
    model = case.build().to(torch.bfloat16).train()
    model.gradient_checkpointing_enable()
    report = convert(model, case.batch)
    assert report.bytes_after < report.bytes_before
    without_checkpointing = copy.deepcopy(model)
    without_checkpointing.gradient_checkpointing_disable()
    for m in (model, without_checkpointing):
        case.forward_loss(m).backward()
    torch.testing.assert_close(_grads(model), _grads(without_checkpointing), **IDENTICAL)


class _Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.block = PreLNBlock()
        self.use_reentrant = use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint(use_reentrant: bool) -> None:
    model = _Checkpointed(use_reentrant)
    x = torch.randn(2, 6, 32, requires_grad=True)
    report = convert(model, x)
    assert "merge" in report.row("block.norm").strategy
    unwrapped = copy.deepcopy(model.block)  # the same converted block, called without checkpoint
    model(x).pow(2).mean().backward()
    unwrapped(x).pow(2).mean().backward()
    torch.testing.assert_close(_grads(model), _grads(unwrapped), **IDENTICAL)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"activations": False, "norms": False, "gated_mlp": False, "dropout": False}, "nothing to convert"),
        ({"bits": 3}, "bits=3"),
        ({"table": "paper", "bits": 4}, "pass bits=2"),
        ({"table": "best"}, "table='best'"),
        ({"affine": "fold"}, "affine='fold'"),
        ({"affine": "merge", "norms": False}, "norms=False"),
        ({"verify": False, "tolerance": 1e-3}, "verify=True"),
        ({"min_keep_weight": 0.0}, "min_keep_weight"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        convert(nn.Sequential(nn.GELU()), **options)


def test_example_input_and_probe_are_exclusive() -> None:
    with pytest.raises(ValueError, match="either example_input or probe"):
        convert(nn.Sequential(nn.GELU()), torch.randn(2), probe=lambda m: m(torch.randn(2)))


def test_a_float64_llama_converts_with_default_options() -> None:
    """Its RMSNorms compute in fp32 inside: the converted (fp64) model differs by about 1e-7."""
    case = CASES["llama"]
    model = case.build().double()
    report = convert(model, {"input_ids": case.batch["input_ids"]})
    assert report.converted and 0 < report.max_error < REPORTED_ERROR_FP64_WITH_FP32_NORMS


def test_an_empty_probe_batch_is_refused_and_leaves_the_model_unchanged() -> None:
    model = PreLNBlock()
    before = str(model)
    with pytest.raises(ValueError, match="produced no output elements"):
        convert(model, torch.randn(0, 32))
    assert str(model) == before


def test_the_printed_report_keeps_every_word_of_a_long_reason() -> None:
    from lightning_approxbp.conversion import ConversionReport

    reason = " ".join(f"word{i}" for i in range(60))
    report = ConversionReport()
    report.add("encoder.layer.0.output.LayerNorm", "LayerNorm", "skipped", reason=reason)
    text = str(report)
    assert "..." not in text
    assert " ".join(text.split()).count(reason) == 1
    assert max(len(line) for line in text.splitlines()) <= 100


def test_the_report_of_a_real_model_fits_a_100_column_terminal() -> None:
    case = CASES["bert"]
    text = str(convert(case.build().train(), case.batch))
    assert max(len(line) for line in text.splitlines()) <= 100, text
    assert "converted" in text and "saved for backward" in text


def test_the_report_states_how_long_the_conversion_took() -> None:
    case = CASES["bert"]
    started = time.perf_counter()
    report = convert(case.build().train(), case.batch)
    elapsed = time.perf_counter() - started
    assert report.seconds is not None and 0 < report.seconds <= elapsed
    assert str(report).splitlines()[-1] == f"conversion took {report.seconds:.2f} s"
    assert report.to_dict()["seconds"] == report.seconds


def test_a_kept_affine_whose_weight_becomes_unsafe_falls_back_to_exact_saving() -> None:
    """Weights moved near zero after conversion (as training could) must not corrupt gradients."""
    case = CASES["bert"]
    model = case.build().train()
    reference = copy.deepcopy(model)
    report = convert(model, case.batch, activations=False)
    name = "bert.encoder.layer.0.output.LayerNorm"
    assert "keep" in report.row(name).strategy
    for m in (model, reference):
        with torch.no_grad():
            m.get_submodule(name).weight[:3] = torch.tensor([1e-6, 0.0, -1e-6])
    with pytest.warns(UserWarning, match="now saves its input like a stock norm"):
        case.forward_loss(model).backward()
    case.forward_loss(reference).backward()
    assert _relative_error(_grads(model), _grads(reference)) < EXACT_GRADS_MAX_RELATIVE_FP32
    assert "exact fallback" in str(model.get_submodule(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every step
        case.forward_loss(model).backward()


def _bf16_step(case: Case, model: nn.Module) -> tuple[int, Tensor, Tensor]:
    """Saved bytes, output and gradients of one bf16-autocast step."""
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorCounter(exclude=model.parameters()) as counter:
        output = case.call(model)
    loss = case.loss(output)
    loss.backward()
    return counter.stats.activation_bytes, output_tensors(output)[0], _grads(model)


@pytest.mark.parametrize("name", ["bert", "peft_bert"])
def test_post_ln_consumers_share_the_norm_output_bit_identically(name: str) -> None:
    """Post-LN: the norm output is the fp32 residual stream; q/k/v and the MLP input keep a
    reference to it (the norm saves it anyway) instead of a bf16 copy each."""
    case = CASES[name]
    model = case.build().train()
    results = {}
    for share in (False, True):
        converted = copy.deepcopy(model)
        report = convert(converted, case.batch, share_norm_output=share)
        results[share] = _bf16_step(case, converted)
    sharing = [row.fqn for row in report.rows if row.strategy.endswith(", no copy")]
    assert len(sharing) >= 8  # q, k, v and the MLP input of both layers (plus LoRA's A where it reads the norm)
    (bytes_copy, out_copy, grads_copy), (bytes_shared, out_shared, grads_shared) = results[False], results[True]
    assert torch.equal(out_copy, out_shared) and torch.equal(grads_copy, grads_shared)
    if name == "bert":  # all trainable: each stops keeping autocast's bf16 copies of its input and weight
        layers = dict(model.named_modules())
        tokens = case.batch["input_ids"].numel()
        copies = sum((tokens + layers[fqn].out_features) * layers[fqn].in_features * 2 for fqn in sharing)
        assert bytes_copy - bytes_shared == copies
    else:  # frozen embeddings: layer 0's inputs need no grad, the norm saved nothing to share there
        assert bytes_shared < bytes_copy


def test_convert_under_autocast_still_recognises_norms() -> None:
    """Detection compares formulas; an autocast context around convert must not change them."""
    case = CASES["bert"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = convert(case.build(), case.batch)
    assert report.row("bert.encoder.layer.0.output.LayerNorm").action == "converted"


def test_a_probe_batch_the_model_rejects_says_so_and_leaves_the_model_unchanged() -> None:
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ProbeError, match=r"probe batch \(example_input\) did not run through the model") as info:
        convert(model, torch.randn(4, 15))
    assert "normalized_shape" in str(info.value) and "Pass one batch the way the model's forward takes it" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [type(m) for m in model.modules()] == before
    assert len(str(info.value).splitlines()) <= 10


def test_every_layer_that_reads_a_norm_output_has_a_row() -> None:
    """BERT's first q/k/v read the embeddings' norm output through dropout: left alone, and said why."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100)  # with BERT's dropout
    batch = {"input_ids": torch.randint(0, 100, (2, 8))}
    report = convert(transformers.BertModel(config).train(), batch)
    first = [row for row in report.rows if ".layer.0.attention.self." in row.fqn and row.kind == "Linear"]
    assert [row.fqn.rsplit(".", 1)[1] for row in first] == ["query", "key", "value"]
    assert all(row.action == "skipped" and "through" in row.reason and "dropout" in row.reason for row in first)
    second = [row for row in report.rows if ".layer.1.attention.self." in row.fqn and row.kind == "Linear"]
    assert len(second) == 3 and all(row.action == "converted" for row in second)


def test_the_layers_reading_a_skipped_norm_say_so() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight[0] = 0.0  # unsafe to keep; merge forced off below
    report = convert(model, torch.randn(3, 8), affine="keep", activations=False)
    assert report.row("0").action == "skipped"
    assert report.row("1").action == "skipped" and "which was skipped" in report.row("1").reason
