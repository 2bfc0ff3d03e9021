"""Weight averaging (``train.ema``): an exponential moving average of a network's weights
and buffers, which is the model each epoch evaluates and ``best.pt`` keeps.

After update n (1-based) every floating-point entry a of the state becomes
``a <- d_n * a + (1 - d_n) * w`` with ``d_n = min(ema, (1 + n) / (10 + n))``, the
warmed-up decay of TensorFlow's ``ExponentialMovingAverage(num_updates=n)``, so early
averages do not drag the random initial weights along. Integer buffers (BatchNorm's
batch counts) are copied. Elementwise: each member of a fused group is averaged as it
would be alone.
"""
from __future__ import annotations

import copy

import torch


class Average:
    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self._live = net.state_dict()  # detached views of the live tensors: they follow training
        self.state = {k: v.clone() for k, v in self._live.items()}
        self._floats = [k for k, v in self._live.items() if v.is_floating_point()]

    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([self.state[k] for k in self._floats], [self._live[k] for k in self._floats], 1 - d)
        for k, v in self._live.items():
            if not v.is_floating_point():
                self.state[k].copy_(v)

    def network(self, net: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``net`` holding the averaged state."""
        out = copy.deepcopy(net)
        out.load_state_dict(self.state)
        return out

    def state_dict(self) -> dict:
        return {"updates": self.updates, "state": self.state}

    def load_state_dict(self, stored: dict) -> None:
        self.updates = stored["updates"]
        for k, v in stored["state"].items():
            self.state[k].copy_(v)
