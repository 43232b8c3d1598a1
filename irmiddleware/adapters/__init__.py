"""The built-in backend adapters: how the router speaks each protocol (paths, where the model is,
error bodies, model discovery, health, load signals, overload answers).

`OpenAIAdapter` is the OpenAI-compatible protocol; `VLLMAdapter` and `TGIAdapter` build on it
where their servers speak it, `TritonAdapter` speaks KServe v2. They are classes of
`irmiddleware.hooks.BackendAdapter` (the protocol-neutral contract) and reach the router the way a
third party's would: the built-in plugins (`irmiddleware_plugins`) register them through the
`irm_adapters` hook. A plugin for another OpenAI-compatible server subclasses `OpenAIAdapter`.
"""

from irmiddleware.adapters._openai import OpenAIAdapter, prompt_text
from irmiddleware.adapters._tgi import TGIAdapter
from irmiddleware.adapters._triton import TritonAdapter
from irmiddleware.adapters._vllm import VLLMAdapter

__all__ = ["OpenAIAdapter", "TGIAdapter", "TritonAdapter", "VLLMAdapter", "prompt_text"]
