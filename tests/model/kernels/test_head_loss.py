"""tunelab.model.kernels.head_loss: the LM head and cross-entropy in row chunks equal the plain path, and keep no logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.model.kernels import head_loss
from tunelab.model.kernels.head_loss import fused_head_loss


def plain_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """What the training loss computed before: the whole (N, vocab) logits, then cross-entropy in fp32."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def loss_and_grads(fn, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, scale: float,
                   autocast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = hidden.detach().clone().requires_grad_(True)
    head.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(hidden, head, targets)
    (loss * scale).backward()  # the training loop scales the sum by 1 / (the step's trained tokens)
    return loss.detach(), hidden.grad, head.weight.grad.clone()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 rows for a 50-token vocabulary: the tests below then cross chunk boundaries."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS", 150)


@pytest.mark.parametrize("rows", [1, 7, 9])  # within one chunk, and across 3 chunks (7: the last one short)
def test_fp64_gradients_match_finite_differences(small_chunks, rows):
    torch.manual_seed(0)
    head = nn.Linear(6, 50, bias=False).double()
    hidden = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (rows,))
    assert torch.autograd.gradcheck(lambda h, w: head_loss._FusedHeadLoss.apply(h, w, targets, torch.float64, True),
                                    (hidden, head.weight))


@pytest.mark.parametrize("rows", [5, 9])
def test_fp32_loss_and_gradients_equal_the_plain_path(small_chunks, rows):
    torch.manual_seed(1)
    head = nn.Linear(16, 50, bias=False)
    hidden, targets = torch.randn(rows, 16) * 3, torch.randint(0, 50, (rows,))
    fused = loss_and_grads(fused_head_loss, hidden, head, targets, 0.1, autocast=False)
    plain = loss_and_grads(plain_loss, hidden, head, targets, 0.1, autocast=False)
    assert fused[0].dtype == torch.float32
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_plain_path_as_closely_as_its_own_rounding(small_chunks):
    """Under bf16 autocast both paths round the logits and the logit gradient to bf16; measured against the
    same loss in fp32, the fused path must be as close as the plain one (within a small factor)."""
    torch.manual_seed(2)
    head = nn.Linear(32, 50, bias=False)
    hidden, targets = torch.randn(11, 32), torch.randint(0, 50, (11,))
    exact = loss_and_grads(plain_loss, hidden, head, targets, 1 / 11, autocast=False)
    fused = loss_and_grads(fused_head_loss, hidden, head, targets, 1 / 11, autocast=True)
    plain = loss_and_grads(plain_loss, hidden, head, targets, 1 / 11, autocast=True)
    for name, got, base, want in zip(("loss", "hidden grad", "weight grad"), fused, plain, exact):
        err_fused = (got.float() - want).abs().max()
        err_plain = (base.float() - want).abs().max()
        assert err_fused <= 2 * err_plain + 1e-6 * want.abs().max(), f"{name}: {err_fused} vs plain {err_plain}"
        torch.testing.assert_close(got.float(), base.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert fused[1].dtype == torch.float32  # the gradient has the input's dtype, as autograd's would


def test_bf16_weights_without_autocast_compute_in_bf16():
    """A bf16 model trained without autocast (frozen bf16 head, bf16 hidden states) runs the products in bf16."""
    torch.manual_seed(3)
    head = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    head.weight.requires_grad_(False)
    hidden = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (4,))
    loss = fused_head_loss(hidden, head, targets)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = plain_loss(ref_hidden, head, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=2e-2, atol=2e-3)


def test_no_gradient_work_without_grad():
    """Under no_grad (validation) the loss is the same, and only the logits' product runs (with gradients, the
    logit gradient's product with the head runs too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(4)
    head = nn.Linear(16, 50, bias=False)
    hidden, targets = torch.randn(6, 16, requires_grad=True), torch.randint(0, 50, (6,))
    with torch.no_grad(), Products() as without:
        loss = fused_head_loss(hidden, head, targets)
    assert loss.grad_fn is None and without.count == 1
    torch.testing.assert_close(loss, plain_loss(hidden, head, targets).detach())
    with Products() as with_grad:
        fused_head_loss(hidden, head, targets)
    assert with_grad.count == 3  # logits, then the hidden states' and the head's gradients


def test_a_head_that_is_not_a_plain_linear_is_left_to_the_caller():
    hidden, targets = torch.randn(3, 8), torch.randint(0, 20, (3,))
    assert fused_head_loss(hidden, nn.Linear(8, 20, bias=True), targets) is None

    class Adapted(nn.Linear):  # e.g. PEFT's LoRA layer on the head, or a quantized linear
        pass

    assert fused_head_loss(hidden, Adapted(8, 20, bias=False), targets) is None


def test_token_loss_sum_keeps_no_logits_for_backward(tiny_model_dir):
    """The training loss of the tiny Llama: what autograd saves holds nothing vocab-wide, while the plain path
    saves its (N, vocab) log-softmax; loss and LoRA gradients are those of the plain path."""
    from transformers import AutoModelForCausalLM

    from tunelab.config import LoraConfig
    from tunelab.data.batches import collate
    from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
    from tunelab.model import scoring
    from tunelab.model.load import attach_lora

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                        LoraConfig(rank=4, alpha=8))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, trained in [(9, 4), (6, 6), (12, 3)]:
        ids = torch.randint(2, vocab, (n,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (n - trained) + ids[n - trained:], f"e{n}"))
    batch = collate(examples, 0, share_prefix=False)

    def run(loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Size]]:
        shapes: list[torch.Size] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            shapes.append(t.shape)
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, shapes

    def plain() -> torch.Tensor:
        hidden, targets, head = scoring.trained_hidden(model, batch)
        return plain_loss(hidden, head, targets)

    fused_loss, fused_grads, fused_saved = run(lambda: scoring.token_loss_sum(model, batch)[0])
    plain_loss_, plain_grads, plain_saved = run(plain)
    assert any(s[-1] == vocab for s in plain_saved)  # the check can see the logits where they are kept
    assert not any(s and s[-1] == vocab for s in fused_saved), fused_saved
    torch.testing.assert_close(fused_loss, plain_loss_, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
