"""The causal-LM loss through the fused linear + cross-entropy: same loss and gradients, logits None."""

from __future__ import annotations

import pytest
import torch

from lightning_approxbp import ConversionConfig, convert
from lightning_approxbp.conversion.fused_loss import FusedLMHead
from tests.tolerances import FUSED_LOSS_GRADS_MAX_RELATIVE_FP32, IDENTICAL, LOSS_FP32

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:ApproxBP. nothing to convert", "ignore::FutureWarning")

VOCAB = 97
# Only the fused loss: the other conversions would change gradients (2-bit activations).
ONLY_FUSED = {"activations": False, "norms": False, "gated_mlp": False, "dropout": False, "fused_loss": True}
# "auto" with nothing else to convert in these models (they have no nn.Dropout modules).
AUTO_ONLY = {"activations": False, "norms": False, "gated_mlp": False, "dropout": True, "fused_loss": "auto"}


def _llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def _gpt2():  # ties lm_head.weight to the token embedding
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _gemma2():  # final_logit_softcapping=30 by default; a small cap makes it matter
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=8, final_logit_softcapping=2.0))


MODELS = {"llama": _llama, "gpt2": _gpt2, "gemma2": _gemma2}


def _pair(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    reference = MODELS[name]()
    reference.load_state_dict(model.state_dict())
    return model.train(), reference.train()


def _batch():
    ids = torch.randint(0, VOCAB, (3, 13))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    return ids, labels


def _loss_row(report):
    """The fused-loss row: named after the head, with the model's class as kind."""
    (row,) = [r for r in report.rows if r.kind.endswith(("ForCausalLM", "LMHeadModel"))]
    return row


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_items", [None, 17])
def test_same_loss_and_gradients_as_transformers(name, num_items):
    model, reference = _pair(name)
    parameters = dict(model.named_parameters())
    keys = list(model.state_dict())
    ids, labels = _batch()
    report = convert(model, config=ConversionConfig(**ONLY_FUSED))
    assert _loss_row(report).action == "converted"
    assert isinstance(model.lm_head, FusedLMHead) and list(model.state_dict()) == keys
    assert all(p is parameters[n] for n, p in model.named_parameters())
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ours = model(input_ids=ids, labels=labels, **extra)
    theirs = reference(input_ids=ids, labels=labels, **extra)
    assert ours.logits is None and theirs.logits is not None
    torch.testing.assert_close(ours.loss, theirs.loss, **LOSS_FP32)
    ours.loss.backward()
    theirs.loss.backward()
    for (key, mine), other in zip(model.named_parameters(), reference.parameters()):
        assert _relative(mine.grad, other.grad) <= FUSED_LOSS_GRADS_MAX_RELATIVE_FP32, key


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_eval_and_calls_without_labels_are_unchanged(name):
    model, reference = _pair(name)
    convert(model, config=ConversionConfig(**ONLY_FUSED))
    ids, labels = _batch()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, **IDENTICAL)
    model.eval()
    reference.eval()
    ours, theirs = model(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, **IDENTICAL)
    torch.testing.assert_close(ours.loss, theirs.loss, **IDENTICAL)


def test_auto_fuses_when_the_probe_uses_the_loss_only():
    model, reference = _pair("llama")
    ids, labels = _batch()
    report = convert(model, probe=lambda m: m(input_ids=ids, labels=labels).loss, **AUTO_ONLY)
    row = _loss_row(report)
    assert row.action == "converted" and "the probe uses the loss and not the logits" in row.reason
    assert "outputs.logits is None" in row.reason
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss)


def test_auto_leaves_the_head_alone_when_the_step_reads_the_logits():
    model, _ = _pair("llama")
    ids, labels = _batch()

    def training_step(m):
        out = m(input_ids=ids, labels=labels)
        accuracy = (out.logits[:, :-1].argmax(-1) == labels[:, 1:]).float().mean()
        return out.loss + 0 * accuracy

    report = convert(model, probe=training_step, **AUTO_ONLY)
    row = _loss_row(report)
    assert row.action == "skipped" and "computes with outputs.logits" in row.reason
    assert type(model.lm_head) is torch.nn.Linear
    assert model(input_ids=ids, labels=labels).logits is not None


@pytest.mark.parametrize(
    "how, reason",
    [
        ("none", "no training-step probe"),
        ("example_input", "no training-step probe"),
        ("step without labels", "passes no labels"),
    ],
)
def test_auto_needs_a_training_step_probe_that_passes_labels(how, reason):
    model, _ = _pair("llama")
    ids, labels = _batch()
    arguments = {
        "none": {},
        "example_input": {"example_input": {"input_ids": ids, "labels": labels}},
        "step without labels": {"probe": lambda m: m(input_ids=ids).logits.sum()},
    }[how]
    with pytest.warns(UserWarning, match="nothing to convert"):
        report = convert(model, **arguments, **AUTO_ONLY)
    if how == "step without labels":
        assert _loss_row(report).action == "skipped" and reason in _loss_row(report).reason
    else:  # nothing was examined: a note, not a row
        assert not report.rows and any(note.startswith("lm_head: loss not fused") and reason in note
                                       for note in report.notes)
    assert type(model.lm_head) is torch.nn.Linear


def test_the_default_conversion_fuses_the_merged_head_exactly():
    """With every conversion on, the final norm's affine is merged into the head; the fused loss
    applies it too (forward only: the 2-bit activations change gradients, not the loss)."""
    model, reference = _pair("llama")
    ids, labels = _batch()
    report = convert(model, probe=lambda m: m(input_ids=ids, labels=labels).loss)
    assert _loss_row(report).action == "converted" and report.row("lm_head").kind == "Linear"
    # The byte counts come from the conversion's own probe runs (no extra run); the report says so.
    assert any("counted before the causal-LM loss was fused" in note for note in report.notes)
    assert report.row("model.norm").action == "converted"
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss)


def test_converting_twice_changes_nothing_and_fused_loss_false_does_nothing():
    model, _ = _pair("llama")
    convert(model, config=ConversionConfig(**ONLY_FUSED))
    head = model.lm_head
    again = convert(model, config=ConversionConfig(**ONLY_FUSED))
    assert _loss_row(again).action == "unchanged" and model.lm_head is head
    plain, _ = _pair("llama")
    ids, labels = _batch()
    report = convert(plain, {"input_ids": ids, "labels": labels}, fused_loss=False)
    assert not isinstance(plain.lm_head, FusedLMHead)
    assert not [r for r in report.rows if r.kind == "LlamaForCausalLM"]


def test_a_head_with_lora_or_a_custom_loss_is_reported_and_left_alone():
    model, _ = _pair("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    report = convert(model, config=ConversionConfig(**ONLY_FUSED))
    assert "not transformers' ForCausalLMLoss" in _loss_row(report).reason
    peft = pytest.importorskip("peft")
    model, _ = _pair("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    report = convert(lora, config=ConversionConfig(**ONLY_FUSED))
    row = _loss_row(report)
    assert row.fqn == "base_model.model.lm_head" and row.action == "skipped" and "not a plain nn.Linear" in row.reason


def test_peft_lora_on_the_blocks_keeps_the_fused_loss_exact():
    peft = pytest.importorskip("peft")
    model, reference = _pair("llama")
    targets = ["q_proj", "v_proj"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    lora_ref = peft.get_peft_model(reference, peft.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
    lora_ref.load_state_dict(lora.state_dict())
    ids, labels = _batch()
    report = convert(lora, probe=lambda m: m(input_ids=ids, labels=labels).loss, **AUTO_ONLY)
    assert _loss_row(report).action == "converted"
    ours, theirs = lora(input_ids=ids, labels=labels), lora_ref(input_ids=ids, labels=labels)
    assert ours.logits is None
    torch.testing.assert_close(ours.loss, theirs.loss, **LOSS_FP32)
    ours.loss.backward()
    theirs.loss.backward()
    trained = [(p, q) for p, q in zip(lora.parameters(), lora_ref.parameters()) if p.requires_grad]
    assert trained and all(_relative(p.grad, q.grad) <= FUSED_LOSS_GRADS_MAX_RELATIVE_FP32 for p, q in trained)


def test_fused_loss_option_is_validated():
    with pytest.raises(ValueError, match="fused_loss='yes' is unknown"):
        ConversionConfig(fused_loss="yes")
