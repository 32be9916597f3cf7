"""Optional generation on vLLM (GPU users): `--generation_backend vllm`.

One vLLM engine per process, colocated with training on the same device. Before each rollout the
trained policy's current weights are pushed into it (LoRA adapters merged into copies: merging in
place and back, as peft's merge_adapter does, rounds a bf16/fp16 base a little more each time), so
it samples from pi_old. Log-probabilities are still computed by the training model, so importance
ratios and KLs are exactly what the algorithms define; vLLM only proposes the tokens.

vLLM is imported only when this backend is asked for; it is not a dependency of p3o.
"""
from __future__ import annotations

import os
import socket

import torch

from p3o.errors import UsageError
from p3o.models.lora import is_lora, merged_lora_state_dict
from p3o.rl.rollout import pad_responses
from p3o.utils.ops import response_mask_from_eos
from p3o.utils.seeding import derived_seed


class VLLMGenerator:
    def __init__(self, cfg, model_name_or_path: str, eos_ids: list[int], max_model_len: int, accelerator,
                 max_num_seqs: int):
        if model_name_or_path.lower().endswith(".gguf"):  # vLLM would keep its quantised blocks, which no sync can update
            raise UsageError(f"--generation_backend vllm needs a plain checkpoint, not {model_name_or_path}; convert it "
                             "first: p3o fetch-model FILE.gguf --output_dir DIR")
        try:
            import vllm
        except ImportError as error:  # absent, or installed against another torch or transformers
            raise UsageError(f"--generation_backend vllm needs vLLM, which runs on GPUs, and importing it failed "
                             f"({error}): pip install vllm in a version built for this torch and transformers "
                             "(or use the default --generation_backend transformers)") from None
        self.vllm, self.cfg, self.eos_ids = vllm, cfg, eos_ids
        # As TRL's colocate mode: the engine runs inside this process ("external_launcher", which is
        # also what exposes its model for `load_weights`), one per training process.
        os.environ.setdefault("RANK", str(accelerator.process_index))
        os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))  # `accelerate launch` sets its own
        self.llm = vllm.LLM(model=model_name_or_path, tokenizer=cfg.tokenizer_name_or_path or model_name_or_path,
                            dtype=sampling_dtype(cfg), gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                            max_model_len=max_model_len, max_num_seqs=max_num_seqs,  # one rollout: no more graphs
                            distributed_executor_backend="external_launcher", seed=cfg.seed + accelerator.process_index,
                            trust_remote_code=cfg.trust_remote_code, enable_prefix_caching=True)

    def sync_weights(self, policy) -> None:
        """Push `policy`'s current weights (names as in its Hugging Face checkpoint) into vLLM."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():  # the merged deltas would otherwise record a graph of the adapters
            if is_lora(policy):
                engine_model.load_weights(merged_lora_state_dict(policy).items())
            else:
                engine_model.load_weights((name, p.data) for name, p in policy.named_parameters())
        self.llm.reset_prefix_cache()

    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor, k: int, stream: str, step: int,
               greedy: bool = False):
        """(B, Lq) prompts, each repeated k times in consecutive rows -> response ids and mask (B, T)."""
        cfg = self.cfg
        prompts = [q[m.bool()].tolist() for q, m in zip(query_ids[::k], query_mask[::k])]  # (G,) unpadded
        sampling = {"temperature": 0.0} if greedy else {"temperature": cfg.temperature, "top_k": cfg.top_k or -1,
                                                        "top_p": cfg.top_p}
        # One seed per prompt: vLLM derives its k responses' streams from it, so a seed shared by all
        # prompts would give every prompt's j-th response the same noise. Responses end at p3o's EOS
        # ids only (ignore_eos drops vLLM's own choice, which may include ordinary words).
        params = [self.vllm.SamplingParams(n=k, max_tokens=cfg.max_new_tokens, stop_token_ids=self.eos_ids or None,
                                           ignore_eos=True, seed=derived_seed(cfg.seed, f"{stream}/{g}", step),
                                           **sampling)
                  for g in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        responses = [list(c.token_ids) for out in outputs for c in out.outputs]  # (B,) group by group
        if len(responses) != query_ids.shape[0]:
            raise RuntimeError(f"vLLM returned {len(responses)} responses for {query_ids.shape[0]} rows")
        ids, _ = pad_responses(responses, pad_id=0)  # (B, T); the mask comes from EOS positions, as for generate
        ids = ids.to(query_ids.device)
        return ids, _mask(ids, responses, self.eos_ids)


def sampling_dtype(cfg) -> str:
    """The dtype vLLM holds the weights in: the policy's own, except that float32 weights trained under
    --mixed_precision bf16/fp16 sample in that precision, as the transformers backend does under
    autocast (vLLM's fast attention kernels take no float32)."""
    if cfg.torch_dtype == "float32" and cfg.mixed_precision in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[cfg.mixed_precision]
    return cfg.torch_dtype


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _mask(ids: torch.Tensor, responses: list[list[int]], eos_ids: list[int]) -> torch.Tensor:
    """Up to and including the first EOS, and never beyond the response's own length."""
    lengths = torch.tensor([len(r) for r in responses], device=ids.device)  # (B,)
    within = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]  # (B, T)
    return response_mask_from_eos(ids, eos_ids) * within.long()
