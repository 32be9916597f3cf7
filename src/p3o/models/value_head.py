"""PPO's critic: a scalar value head on the policy's last hidden state (one trunk, one forward pass)."""
from __future__ import annotations

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValueHead(nn.Module):
    """`policy` plus a linear value head. Called like the policy, it returns `(outputs, values)` with
    values (B, L') at the same positions as the logits (the last `logits_to_keep` ones if given)."""

    returns_values = True  # the engine's contract for a wrapped policy (`Algorithm.wrap_policy`)

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        # FSDP's transformer-based wrapping shards the blocks the policy names (not only the root).
        self._no_split_modules = getattr(policy, "_no_split_modules", None)
        hidden = policy.get_output_embeddings().in_features
        self.value_head = nn.Linear(hidden, 1, dtype=policy.get_output_embeddings().weight.dtype)
        # V starts at 0 everywhere: no random critic for the first advantages to absorb.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, logits_to_keep: int = 0, **kwargs):
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        outputs = self.policy(output_hidden_states=True, **kwargs)
        hidden = outputs.hidden_states[-1]  # (B, L, H): the final (normed) hidden state the LM head reads
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return outputs, self.value_head(hidden).squeeze(-1).float()  # (B, L')


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A PolicyWithValueHead state dict -> (policy's, value head's), each with its own key names."""
    policy = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
    head = {k[len("value_head."):]: v for k, v in state_dict.items() if k.startswith("value_head.")}
    return policy, head
