"""`--compile`: each decoder layer through torch.compile (inductor, on the CPU here). The loss and every
gradient equal eager's within float tolerance; parameter names do not change (checkpoints load either
way); a compiled pretraining run gives eager's losses, and resumes."""

from __future__ import annotations

import torch

from models import DenseLM, make_config


def test_compiled_layers_give_eagers_loss_and_gradients():
    torch.manual_seed(0)
    model = DenseLM(make_config("dense", "micro", vocab_size=120)).train()
    ids = torch.randint(0, 120, (2, 32))

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, targets=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    names = list(model.state_dict())
    eager_loss, eager_grads = loss_and_grads()
    model.compile_layers()
    loss, grads = loss_and_grads()
    assert list(model.state_dict()) == names
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_pretraining_matches_eager_and_resumes(micro_losses, tmp_path):
    eager = micro_losses(tmp_path / "eager")
    micro_losses(tmp_path / "compiled", "--compile", "--stop-after", "2")
    compiled = micro_losses(tmp_path / "compiled", "--compile", "--resume")
    assert len(compiled) == 4
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)
