"""``torch.compile(model, fullgraph=True)`` of FPET + every PET method, in eval (no_grad, inference_mode) and for a
training step, matching eager; and LoRA under no-grad: never stale, compiles, survives a deep copy made in
inference mode (each of these failed with the cached folded weight LoRA had before). AOTAutograd without code
generation (``aot_eager``) traces the forward and backward graphs as inductor does, without its C++ build."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fpet_kernels as fk
from fpet_kernels.pet import PET_METHODS

from tests.helpers import backend_marks, images, tiny_vit

COMPILER = "aot_eager"
BACKENDS = [pytest.param("reference"), pytest.param("cpp", marks=backend_marks("cpp"))]
NO_DROPOUT = {"adaptformer": {"dropout": 0.0}, "bi-adaptformer": {"dropout": 0.0}}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pet_fpet_model(method, backend="cpp", pool="avg"):
    model = fk.add_pet(tiny_vit(img_size=32, global_pool=pool), method, **NO_DROPOUT.get(method, {}))
    fk.apply_fpet(model, layer=1, refine_dropout=0.0, backend=backend)
    fk.mark_trainable(model)
    return model


@pytest.mark.parametrize("method", sorted(PET_METHODS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_eval_matches_eager(method, backend):
    model = pet_fpet_model(method, backend).eval()
    x = images(model)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILER)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("method", sorted(PET_METHODS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_training_step_matches_eager(method, backend):
    """Train mode (PET and refinement dropout 0, so the forward is deterministic): loss and gradients of one compiled
    forward + backward, and the parameters after one AdamW step, match an eager deep copy (rtol 1e-4, atol 1e-5)."""
    eager = pet_fpet_model(method, backend).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=COMPILER)
    x, labels = images(eager, batch=4), torch.tensor([0, 1, 2, 3])
    explained = torch._dynamo.explain(copy.deepcopy(eager))(x)
    assert explained.graph_break_count == 0, explained.break_reasons

    def step(model, forward):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = F.cross_entropy(forward(x), labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        return loss.detach(), grads

    loss_eager, grads_eager = step(eager, eager)
    loss_compiled, grads_compiled = step(compiled_model, compiled)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    assert grads_compiled.keys() == grads_eager.keys() and grads_eager
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- LoRA under no-grad
def test_lora_under_no_grad_sees_in_place_data_updates():
    model = pet_fpet_model("lora").eval()
    x = images(model)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].attn.qkv.lora_b_q.weight.data.add_(0.5)  # .data: a version counter of its own
        after = model(x)
        with_grad_off = after.clone()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(with_grad_off, model(x).detach())  # the same as the grad-mode path


def test_lora_model_deep_copied_in_inference_mode_runs():
    model = pet_fpet_model("lora").eval()
    x = images(model)
    with torch.inference_mode():
        expected = model(x)
        clone = copy.deepcopy(model)
    with torch.inference_mode():
        torch.testing.assert_close(clone(x), expected)


def test_default_compile_of_fpet_lora_under_no_grad_matches_eager():
    model = pet_fpet_model("lora").eval()
    x = images(model)
    compiled = torch.compile(model, backend=COMPILER)
    with torch.no_grad():
        expected = model(x)  # an eager forward first: the old cache was then filled, and its check broke the graph
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        assert torch._dynamo.explain(model)(x).graph_break_count == 0


class GraphBreak(torch.nn.Module):
    """Wraps a module and breaks torch.compile's graph before calling it (a user module dynamo cannot trace)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.inner(x)


@pytest.mark.parametrize("grad", [False, True])
def test_default_compile_with_a_graph_break_inside_attention_matches_eager(grad):
    """After a graph break inside attention, dynamo reuses the rest of Attention.forward compiled for block 0 without
    checking hooks; the keys of the merge block must still be captured ("could not capture the keys" before)."""
    model = fk.apply_fpet(tiny_vit(img_size=32), layer=2)
    for block in model.blocks:
        block.attn.qkv = GraphBreak(block.attn.qkv)
    x = images(model)
    compiled = torch.compile(model, backend=COMPILER)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
