"""MLServer's Hugging Face runtime with one bug worked around, for bench/serve.py.

mlserver-huggingface 1.7.1 checks `if not tokenizer.pad_token_id` before batching and,
for a BERT tokenizer (whose [PAD] has id 0, so the check is false), logs "Model has
neither pad_token or eos_token" and drops the pipeline's batch size to 1: every text
of an adaptive batch then runs its own forward pass. This subclass restores the
configured batch size when the tokenizer does have a pad token, so the peer pads and
runs a batch in one pass, as tuneserve does. Nothing else changes.

bench/serve.py copies this file beside the model's model-settings.json; MLServer puts
that folder on sys.path when it imports `implementation`.
"""

from mlserver_huggingface import HuggingFaceRuntime


class BatchingHuggingFaceRuntime(HuggingFaceRuntime):
    async def load(self) -> bool:
        loaded = await super().load()
        pipeline = self._model
        if self.settings.max_batch_size > 1 and pipeline.tokenizer.pad_token_id is not None:
            pipeline._batch_size = self.settings.max_batch_size
        return loaded
