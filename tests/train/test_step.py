"""One optimizer step's window (peftchat.train.step) and its one-process-of-several twin
(peftchat.train.distributed.backward_window_sharded) compute the same loss and gradients."""

from contextlib import nullcontext

import torch

from peftchat.data.batching import MicroBatch, Window
from peftchat.train.distributed import SINGLE, backward_window_sharded
from peftchat.train.step import backward_window


def _loss(model, batch, normalizer):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2 * batch["m"]).sum() / normalizer


def _micro(seed: int, labelled: int) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(3)
    m[:labelled] = 1
    return MicroBatch({"x": torch.randn(3, 4, generator=g), "y": torch.randn(3, generator=g), "m": m}, labelled, 3)


class _Batches:
    def micro_batch(self, rows):
        raise AssertionError("the window has a loss-bearing micro-batch of its own")


def _grads(run):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    loss, tokens = run(model)
    return loss, tokens, model.weight.grad.clone()


def test_the_sharded_window_of_one_process_is_the_plain_window():
    micro = [_micro(1, 3), _micro(2, 0), _micro(3, 2)]  # one without labels: no pass, None in per_micro
    plain_losses, sharded_losses = [], []
    loss, tokens, grad = _grads(
        lambda model: backward_window(
            model,
            micro,
            torch.device("cpu"),
            lambda mdl, b, normalizer: _loss(mdl, b, normalizer),
            per_micro=plain_losses,
        )
    )
    window = Window(micro, epoch=0, batch_index=3, epoch_progress=1.0, size=4)  # 4 passes: the last a spare

    def sharded(model):
        total, label_tokens, _, stop = backward_window_sharded(
            lambda b, normalizer: _loss(model, b, normalizer),
            window,
            SINGLE,
            batches=_Batches(),
            accumulation=4,
            device=torch.device("cpu"),
            autocast=nullcontext,
            scaler=None,
            stop_requested=True,
            per_micro=sharded_losses,
        )
        assert stop is True
        return total, label_tokens

    s_loss, s_tokens, s_grad = _grads(sharded)
    assert tokens == s_tokens == 5
    assert torch.equal(loss, s_loss) and torch.allclose(grad, s_grad, rtol=0, atol=1e-7)
    assert plain_losses[1] is None and sharded_losses[1] is None
    assert [float(x) for x in plain_losses if x is not None] == [float(x) for x in sharded_losses if x is not None]
