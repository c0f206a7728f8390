"""peftchat.kernels.offload on CPU: the double buffer's bookkeeping (which input is fetched when, how
many wait on the device), bit-identical gradients to torch's own checkpoint, gradient
accumulation / evaluation / interleaved graphs, and dropout masks equal in forward and recompute."""

import pytest
import torch
from lora_helpers import with_lora

from peftchat.config import TrainingConfig
from peftchat.kernels import offload
from peftchat.train import speedups as kernels

CPU = torch.device("cpu")


class RecordingTransfer(offload.CloneTransfer):
    """CloneTransfer that logs each transfer by the order its input was parked."""

    def __init__(self):
        self.hosts, self.log = [], []
        self.in_flight = self.max_in_flight = 0

    def _index(self, host):
        return next(i for i, h in enumerate(self.hosts) if h is host)

    def park(self, hidden):
        host = super().park(hidden)
        self.hosts.append(host)
        self.log.append(("park", len(self.hosts) - 1))
        return host

    def start_fetch(self, host):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.log.append(("prefetch", self._index(host)))
        return super().start_fetch(host)

    def finish_fetch(self, tensor, ready):
        self.in_flight -= 1
        self.log.append(("wait", self._index(tensor)))
        return super().finish_fetch(tensor, ready)

    def fetch_now(self, host):
        self.log.append(("now", self._index(host)))
        return super().fetch_now(host)


@pytest.fixture
def recorder(monkeypatch):
    rec = RecordingTransfer()
    monkeypatch.setattr(offload.OffloadState, "transfer_for", lambda self, device: rec)
    return rec


def _model(layers=4, skip=1, dropout=0.2, offloaded=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )
    kernels.apply_checkpoint_policy(
        model, TrainingConfig(gradient_checkpointing=True, checkpoint_offload=offloaded, checkpoint_skip_layers=skip)
    )
    return with_lora(model, dropout)


def _ids(seed):
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


def _step(model, seed=2):
    torch.manual_seed(seed + 100)
    loss = model(input_ids=_ids(seed), labels=_ids(seed)).loss
    loss.backward()
    return loss.detach()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_each_backward_prefetches_the_next_input_and_at_most_one_waits(recorder):
    model = _model(layers=4, skip=1)  # layers 0-2 checkpointed, layer 3 keeps its activations
    _step(model)
    assert recorder.log == [
        ("park", 0),
        ("park", 1),
        ("park", 2),
        ("now", 2),
        ("prefetch", 1),
        ("wait", 1),
        ("prefetch", 0),
        ("wait", 0),
    ]
    assert recorder.max_in_flight == 1 and recorder.in_flight == 0


def test_accumulation_and_evaluation_do_not_cross_passes(recorder):
    model = _model(layers=3, skip=0)
    _step(model, seed=2)
    with torch.no_grad():  # evaluation parks nothing
        model(input_ids=_ids(5))
    _step(model, seed=3)  # second micro-batch: its first backward does not reach into the first pass
    assert recorder.log == [
        ("park", 0),
        ("park", 1),
        ("park", 2),
        ("now", 2),
        ("prefetch", 1),
        ("wait", 1),
        ("prefetch", 0),
        ("wait", 0),
    ] + [("park", 3), ("park", 4), ("park", 5), ("now", 5), ("prefetch", 4), ("wait", 4), ("prefetch", 3), ("wait", 3)]
    state = kernels.decoder_layers(model)[0]._gradient_checkpointing_func.keywords["state"]
    assert all(ref() is None for ref in state.last_parked.values())  # nothing kept after backward


def test_each_model_has_its_own_offload_state():
    a, b = _model(layers=2, skip=0), _model(layers=2, skip=0)
    hooks = [layer._gradient_checkpointing_func for m in (a, b) for layer in kernels.decoder_layers(m)]
    assert hooks[0] is hooks[1] and hooks[2] is hooks[3]  # one hook, one state per model
    assert hooks[0].keywords["state"] is not hooks[2].keywords["state"]


@pytest.mark.parametrize("skip", [0, 2])
def test_offload_gives_torch_checkpoints_loss_and_gradients_bit_for_bit(skip):
    ref = _model(skip=skip, offloaded=False)
    ref_loss = _step(ref)
    model = _model(skip=skip)
    loss = _step(model)
    assert torch.equal(loss, ref_loss)
    got, want = _grads(model), _grads(ref)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_two_graphs_backwarded_in_reverse_order_give_the_sequential_gradients(recorder):
    ref = _model(layers=3, skip=0)
    _step(ref, seed=2)
    _step(ref, seed=3)
    recorder.hosts.clear(), recorder.log.clear()
    model = _model(layers=3, skip=0)
    torch.manual_seed(102)
    first = model(input_ids=_ids(2), labels=_ids(2)).loss
    torch.manual_seed(103)
    second = model(input_ids=_ids(3), labels=_ids(3)).loss
    second.backward()  # its last backward prefetches the first graph's last input: used later
    first.backward()
    assert recorder.log[6:] == [
        ("now", 5),
        ("prefetch", 4),
        ("wait", 4),
        ("prefetch", 3),
        ("wait", 3),
        ("prefetch", 2),  # the first graph's last input, taken by its backward
        ("wait", 2),
        ("prefetch", 1),
        ("wait", 1),
        ("prefetch", 0),
        ("wait", 0),
    ]
    assert recorder.max_in_flight == 1
    got, want = _grads(model), _grads(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-8)


def test_dropout_masks_are_the_same_in_forward_and_recompute():
    model = _model(layers=2, skip=0, dropout=0.3)
    seen: dict[str, list] = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, []).append((torch.is_grad_enabled(), output != 0))

        return hook

    for name, module in model.named_modules():
        if name.endswith("lora_dropout.default"):
            module.register_forward_hook(record(name))
    _step(model)
    assert len(seen) == 2 * 7
    for name, calls in seen.items():
        (fwd_grad, fwd_mask), (re_grad, re_mask) = calls  # forward without autograd, then the recompute
        assert not fwd_grad and re_grad
        assert torch.equal(fwd_mask, re_mask), name
        assert 0.5 < fwd_mask.float().mean() < 0.9  # dropout did drop


def test_nested_checkpoints_in_the_recompute_give_plain_autograd_gradients(recorder):
    w = [torch.randn(8, 8, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]

    def inner(x, wi):
        return torch.tanh(x @ wi)

    def layer(h, wi):  # a layer whose body checkpoints again (runs only in its recompute: grad on there)
        return offload.offloaded_checkpoint(inner, h * 2, wi, state=state) + h

    def plain(h, wi):
        return inner(h * 2, wi) + h

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    out = x
    state = offload.OffloadState()
    for wi in w:
        out = offload.offloaded_checkpoint(layer, out, wi, state=state)
    out.sum().backward()
    got = [wi.grad.clone() for wi in w]
    for wi in w:
        wi.grad = None
    ref = x
    for wi in w:
        ref = plain(ref, wi)
    ref.sum().backward()
    for g, wi in zip(got, w):
        torch.testing.assert_close(g, wi.grad)
    # outer inputs 0, 1; the recompute of layer 1 parks input 2, then layer 0's parks input 3
    assert recorder.log == [
        ("park", 0),
        ("park", 1),
        ("now", 1),
        ("prefetch", 0),
        ("park", 2),
        ("now", 2),
        ("wait", 0),
        ("park", 3),
        ("now", 3),
    ]
    assert recorder.max_in_flight == 1
