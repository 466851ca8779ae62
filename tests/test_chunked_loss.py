"""Chunked token losses: exact against the dense path (loss and gradients), and never the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from modalforge.errors import ConfigError
from modalforge.losses import (chunked_cross_entropy, chunked_token_logprobs, resolve_loss_impl, token_logprobs,
                               token_loss)

TOL = dict(atol=1e-6, rtol=1e-6)
V, H = 97, 16


def _inputs(rows=(3, 7), bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    labels = torch.randint(0, V, rows, generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return hidden, weight, b, labels


def _dense_logits(hidden, weight, bias, softcap=None, temperature=1.0):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def _grads(value, tensors):
    return torch.autograd.grad(value, [t for t in tensors if t is not None], retain_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_cross_entropy_equals_dense(reduction, softcap, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    logits = _dense_logits(hidden, weight, b, softcap)
    dense = F.cross_entropy(logits.view(-1, V), labels.view(-1), reduction=reduction).view(
        labels.shape if reduction == "none" else ())
    chunked = chunked_cross_entropy(hidden, weight, labels, bias=b, softcap=softcap, chunk_size=4,
                                    reduction=reduction)  # 4 does not divide 21 rows
    torch.testing.assert_close(chunked, dense, **TOL)
    weights = torch.rand(labels.shape) if reduction == "none" else torch.tensor(1.7)
    for got, want in zip(_grads((chunked * weights).sum(), (hidden, weight, b)),
                         _grads((dense * weights).sum(), (hidden, weight, b))):
        torch.testing.assert_close(got, want, **TOL)


def test_predictions_and_no_grad_path():
    hidden, weight, _, labels = _inputs()
    with torch.no_grad():
        loss, predictions = chunked_cross_entropy(hidden, weight, labels, chunk_size=5, return_predictions=True)
        logits = _dense_logits(hidden, weight, None)
        torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, V), labels.view(-1)), **TOL)
    assert torch.equal(predictions, logits.argmax(-1))


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (0.7, 2.5)])
def test_token_logprobs_and_entropy_equal_dense(temperature, softcap):
    hidden, weight, b, targets = _inputs(bias=True)
    targets = targets.clamp(min=0)
    logp_dense = torch.log_softmax(_dense_logits(hidden, weight, b, softcap, temperature), -1)
    lp_dense = logp_dense.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent_dense = -(logp_dense.exp() * logp_dense).sum(-1)
    lp, ent = chunked_token_logprobs(hidden, weight, targets, bias=b, temperature=temperature, softcap=softcap,
                                     chunk_size=6, return_entropy=True)
    torch.testing.assert_close(lp, lp_dense, **TOL)
    torch.testing.assert_close(ent, ent_dense, **TOL)
    w1, w2 = torch.randn(targets.shape), torch.randn(targets.shape)  # a policy-gradient-like weighting + entropy bonus
    tensors = (hidden, weight, b)
    for got, want in zip(_grads((lp * w1).sum(), tensors), _grads((lp_dense * w1).sum(), tensors)):
        torch.testing.assert_close(got, want, **TOL)
    # The entropy's gradient -p (log p + H) loses digits in fp32 on either path (the dense one is 2e-6 off a
    # float64 reference here too), so it is checked against float64.
    exact = [t.detach().double().requires_grad_() for t in tensors]
    logp64 = torch.log_softmax(_dense_logits(*exact, softcap, temperature).double(), -1)
    ent64 = -(logp64.exp() * logp64).sum(-1)
    for got, want in zip(_grads((lp * w1).sum() + (ent * w2).sum(), tensors),
                         _grads((logp64.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * w1).sum()
                                + (ent64 * w2).sum(), exact)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_token_logprobs_ignore_index_rows_are_zero_without_gradient():
    hidden, weight, _, targets = _inputs()
    lp = chunked_token_logprobs(hidden, weight, targets, chunk_size=8)
    assert torch.all(lp[targets == -100] == 0)
    (grad,) = torch.autograd.grad(lp.sum(), [hidden])
    assert torch.all(grad[targets == -100] == 0) and grad[targets != -100].abs().sum() > 0


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _vocab_rows(shapes, vocab):
    """Most rows of any tensor whose last dim is the vocabulary (the weight itself excluded)."""
    return max((int(torch.Size(s[:-1]).numel()) for s in shapes if s and s[-1] == vocab and s not in ((vocab, H), (H, vocab))),
               default=0)


@pytest.mark.parametrize("fn", ["cross_entropy", "token_logprobs"])
def test_no_tensor_holds_more_than_a_chunk_of_logits(fn):
    hidden, weight, _, labels = _inputs(rows=(4, 25))
    with _Shapes() as seen:
        if fn == "cross_entropy":
            out = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
        else:
            out = chunked_token_logprobs(hidden, weight, labels, chunk_size=8).sum()
        out.backward()
    assert 0 < _vocab_rows(seen.shapes, V) <= 8
    with _Shapes() as dense:  # the check itself sees the full logits of the dense path
        F.cross_entropy(F.linear(hidden, weight).view(-1, V), labels.view(-1)).backward()
    assert _vocab_rows(dense.shapes, V) == 100


# ---- on a model: the switch --------------------------------------------------------------
def _tiny_lm(vocab=V, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return LlamaForCausalLM(config).float()


def _batch(vocab=V):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 8:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


@pytest.mark.parametrize("tie", [False, True])
def test_token_loss_chunked_equals_dense_on_a_model(tie):
    model = _tiny_lm(tie_word_embeddings=tie)
    inputs, labels = _batch()
    results = {}
    for impl in ("dense", "chunked"):
        model.zero_grad()
        out = token_loss(model, labels, impl=impl, **inputs)
        out.loss.backward()
        results[impl] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (dense, dense_grads), (chunked, chunked_grads) = results["dense"], results["chunked"]
    assert dense.count == chunked.count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(chunked.loss, dense.loss, **TOL)
    torch.testing.assert_close(chunked.accuracy, dense.accuracy)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, **TOL, msg=name)


def test_gemma_softcap_is_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=0.5)).float()
    inputs, labels = _batch()
    dense, chunked = (token_loss(model, labels, impl=i, **inputs).loss for i in ("dense", "chunked"))
    torch.testing.assert_close(chunked, dense, **TOL)


def test_auto_and_lora():
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    assert resolve_loss_impl("auto", _tiny_lm())[0] == "dense"  # small vocabulary: one dense matmul
    assert resolve_loss_impl("auto", _tiny_lm(vocab=32_000))[0] == "chunked"
    lora = get_peft_model(_tiny_lm(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    inputs, labels = _batch()
    dense, chunked = (token_loss(lora, labels, impl=i, **inputs).loss for i in ("dense", "chunked"))
    torch.testing.assert_close(chunked, dense, **TOL)
    on_head = get_peft_model(_tiny_lm(), LoraConfig(r=2, target_modules=["lm_head"]))
    assert resolve_loss_impl("auto", on_head)[0] == "dense"
    with pytest.raises(ConfigError, match="LM head is a Linear"):
        resolve_loss_impl("chunked", on_head)
    prefix = get_peft_model(_tiny_lm(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="prompt-learning"):
        resolve_loss_impl("chunked", prefix)


@pytest.mark.parametrize("impl,package", [("liger", "liger-kernel"), ("cce", "cut-cross-entropy")])
def test_gpu_kernels_name_their_package(impl, package):
    pytest.importorskip("torch")
    try:
        __import__({"liger": "liger_kernel", "cce": "cut_cross_entropy"}[impl])
        pytest.skip(f"{package} is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=f"needs the package {package}"):
        resolve_loss_impl(impl, _tiny_lm())
    with pytest.raises(ConfigError, match="not one of"):
        resolve_loss_impl("fused", _tiny_lm())


@pytest.mark.parametrize("keep,temperature", [(None, 1.0), (4, 0.7)])
def test_token_logprobs_chunked_equals_the_models_logits(keep, temperature):
    """What dpo (all positions) and grpo (the completion's last ``keep``, at a temperature) sum."""
    model = _tiny_lm(final_logit_softcapping=None)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as prompts are batched for generation
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = {}
    for impl in ("dense", "chunked"):
        model.zero_grad()
        logps, entropy = token_logprobs(model, ids, keep=keep, impl=impl, temperature=temperature, entropy=True,
                                        attention_mask=mask, position_ids=positions)
        (logps.sum() + 0.1 * entropy.sum()).backward()
        got[impl] = (logps.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()])
    n = ids.shape[1] - 1 if keep is None else keep
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -n - 1:-1].float()
    by_hand = torch.log_softmax(logits / temperature, -1).gather(-1, ids[:, -n:, None]).squeeze(-1)
    assert got["dense"][0].shape == (3, n)
    torch.testing.assert_close(got["dense"][0], by_hand.detach(), **TOL)
    for dense, chunked in zip(got["dense"][:2], got["chunked"][:2]):
        torch.testing.assert_close(chunked, dense, **TOL)
    for dense, chunked in zip(got["dense"][2], got["chunked"][2]):
        torch.testing.assert_close(chunked, dense, **TOL)


def test_token_logprobs_metric_entropy_keeps_no_graph():
    model = _tiny_lm()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(3))
    for impl in ("dense", "chunked"):
        _, entropy = token_logprobs(model, ids, impl=impl, entropy=True, entropy_grad=False)
        assert not entropy.requires_grad, impl


# ---- in the plugins: the same training step with module.loss_impl=chunked and dense --------------
@pytest.mark.parametrize("plugin", ["sft", "causal_lm", "dpo"])
def test_plugin_step_chunked_equals_dense(plugin):
    from modalforge.config import compose
    from modalforge.run import build_components, build_module
    from modalforge.validate import validate_config

    cfg = compose([f"plugin={plugin}", "module.loss_impl=chunked", "data.batch_size=2"])
    validate_config(cfg)
    datamodule, objective, adapter = build_components(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, objective, adapter)
    objective.datamodule = datamodule
    module.configure_model()
    assert objective.loss_impl == "chunked"
    batch = next(iter(datamodule.train_dataloader()))
    results = {}
    for impl in ("dense", "chunked"):
        objective.loss_impl = impl
        module.zero_grad()
        out = objective.training_step(batch)
        out.loss.backward()
        results[impl] = (out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    (dense, dense_grads), (chunked, chunked_grads) = results["dense"], results["chunked"]
    assert chunked.mean_over == dense.mean_over and chunked.num_learned_tokens == dense.num_learned_tokens
    torch.testing.assert_close(chunked.loss, dense.loss, **TOL)
    assert dense_grads.keys() == chunked_grads.keys() and dense_grads
    for name, grad in dense_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, **TOL, msg=name)
    if plugin == "sft":  # the same numbers as before the switch: CE over the learned tokens' logits
        from modalforge.plugins.text.sft.objective import token_loss_and_accuracy

        with torch.no_grad():
            logits = objective.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                     position_ids=batch.get("position_ids"), use_cache=False).logits
        loss, accuracy, count = token_loss_and_accuracy(logits, batch["labels"])
        torch.testing.assert_close(chunked.loss.detach(), loss, **TOL)
        torch.testing.assert_close(chunked.metrics["token_acc"], accuracy)
        assert chunked.mean_over == count
    elif plugin == "causal_lm":  # the model's own loss, as causal_lm took it before the switch
        with torch.no_grad():
            own = objective.model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
        torch.testing.assert_close(chunked.loss.detach(), own, **TOL)
        assert torch.equal(dense.loss.detach(), own)


def test_unknown_loss_impl_is_a_config_error():
    from modalforge.config import compose
    from modalforge.validate import validate_config

    with pytest.raises(ConfigError, match="'fused' is not one of: auto, chunked, dense, liger, cce"):
        validate_config(compose(["plugin=sft", "module.loss_impl=fused"]))
