"""MLServer's Hugging Face runtime with one bug worked around, for bench/serve.py.

mlserver-huggingface 1.7.1 checks `if not tokenizer.pad_token_id` before batching and,
for a BERT tokenizer (whose [PAD] has id 0, so the check is false), logs "Model has
neither pad_token or eos_token" and drops the pipeline's batch size to 1: every text
of an adaptive batch then runs its own forward pass. This subclass restores the
configured batch size when the tokenizer does have a pad token, so the peer pads and
runs a batch in one pass, as tuneserve does. It also lets the settings name the
weights' dtype as a string (`model_kwargs: {"torch_dtype": "bfloat16"}`), which
transformers 4.41 takes only as a torch.dtype, and hands the pipeline float32 logits,
which its post-processing needs (it calls .numpy(), which has no bfloat16), so
bench/serve.py --dtype applies to the peer too. Nothing else changes.

bench/serve.py copies this file beside the model's model-settings.json; MLServer puts
that folder on sys.path when it imports `implementation`.
"""

import torch
from mlserver_huggingface import HuggingFaceRuntime


def _float32_logits(module, inputs, output):
    output["logits"] = output["logits"].float()
    return output


class BatchingHuggingFaceRuntime(HuggingFaceRuntime):
    async def load(self) -> bool:
        kwargs = self.hf_settings.model_kwargs or {}
        if isinstance(kwargs.get("torch_dtype"), str) and kwargs["torch_dtype"] != "auto":
            kwargs["torch_dtype"] = getattr(torch, kwargs["torch_dtype"])
        loaded = await super().load()
        pipeline = self._model
        if pipeline.model.dtype != torch.float32:
            pipeline.model.register_forward_hook(_float32_logits)
        if self.settings.max_batch_size > 1 and pipeline.tokenizer.pad_token_id is not None:
            pipeline._batch_size = self.settings.max_batch_size
        return loaded
