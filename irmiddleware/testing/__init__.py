"""Emulated inference servers for users and for tests.

`create_vllm_app`, `create_triton_app` and `create_tgi_app` build ASGI apps that speak the
protocols of vLLM (OpenAI-compatible), NVIDIA Triton (KServe v2 plus extensions; its metrics on a
separate app, `create_triton_metrics_app`) and Hugging Face TGI: paths, bodies, errors, streaming
and Prometheus metrics, on one shared timing and capacity model, with fault knobs for tests.
`serve_in_thread` runs any such app on a real uvicorn server on 127.0.0.1::

    from irmiddleware.testing import VLLMConfig, create_vllm_app, serve_in_thread

    app = create_vllm_app(VLLMConfig(served_model_names=("m",), max_num_seqs=4))
    with serve_in_thread(app) as server:
        print(server.url)  # http://127.0.0.1:<port>, e.g. for openai.OpenAI(base_url=server.url + "/v1")

Each app's emulator (`VLLMEmulator`, `TritonEmulator`, `TGIEmulator`) is `app.state.emulator`: its
`config`, `stats` (an `EmulatorStats`) and `reconfigure`. Triton's metrics app is
`app.state.metrics_app`; serve it with a second `serve_in_thread`. `count_tokens` is the emulators'
tokenizer; `PrefixCache` and `block_hashes` are the prefix cache the vLLM emulator (and the
simulator) keeps.

Needs the `testing` extra (Starlette and uvicorn). See doc/emulators.md.
"""

from irmiddleware._prefix_cache import PrefixCache, block_hashes
from irmiddleware.testing._engine import EmulatorStats, count_tokens
from irmiddleware.testing._invariants import assert_idle
from irmiddleware.testing._polling import wait_until
from irmiddleware.testing._server import RunningServer, serve_in_thread
from irmiddleware.testing._tgi import TGIConfig, TGIEmulator, create_tgi_app
from irmiddleware.testing._triton import (
    TritonConfig,
    TritonEmulator,
    TritonModel,
    TritonTensor,
    create_triton_app,
    create_triton_metrics_app,
)
from irmiddleware.testing._vllm import VLLMConfig, VLLMEmulator, create_vllm_app

__all__ = [
    "EmulatorStats",
    "PrefixCache",
    "RunningServer",
    "TGIConfig",
    "TGIEmulator",
    "TritonConfig",
    "TritonEmulator",
    "TritonModel",
    "TritonTensor",
    "VLLMConfig",
    "VLLMEmulator",
    "assert_idle",
    "block_hashes",
    "count_tokens",
    "create_tgi_app",
    "create_triton_app",
    "create_triton_metrics_app",
    "create_vllm_app",
    "serve_in_thread",
    "wait_until",
]
