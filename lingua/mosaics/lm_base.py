"""What the Memory Mosaics language models (v1 in model.py, v2 in v2.py) share: the loss from
their logits, per position (eval) or averaged (training), with the first `model.skip_tokens`
positions left out of training. Subclasses provide `logits(tokens)` and `args` (a MosaicsArgs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # target value that contributes no loss


class MosaicsLMBase(nn.Module):
    """tokens (B, T) -> logits (B, T, V), or the mean cross-entropy when targets are given."""

    def logits(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def token_losses(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Per-position fp32 cross-entropy (B, T); ignored targets give 0."""
        logits = self.logits(tokens)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return losses.view(targets.shape)

    def forward(self, tokens: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is None:
            return self.logits(tokens)
        if self.args.skip_tokens:
            targets = targets.clone()
            targets[:, : self.args.skip_tokens] = IGNORE_INDEX
        logits = self.logits(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
