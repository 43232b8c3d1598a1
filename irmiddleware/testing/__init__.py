"""Emulated inference servers for users and for tests.

`create_vllm_app` builds an ASGI app that speaks vLLM's OpenAI-compatible protocol (paths, bodies,
errors, streaming and Prometheus metrics) on a configurable timing and capacity model, with fault
knobs for tests. `serve_in_thread` runs any such app on a real uvicorn server on 127.0.0.1::

    from irmiddleware.testing import VLLMConfig, create_vllm_app, serve_in_thread

    app = create_vllm_app(VLLMConfig(served_model_names=("m",), max_num_seqs=4))
    with serve_in_thread(app) as server:
        print(server.url)  # http://127.0.0.1:<port>, e.g. for openai.OpenAI(base_url=server.url + "/v1")

Needs the `testing` extra (Starlette and uvicorn). See doc/emulators.md.
"""

from irmiddleware.testing._invariants import assert_idle
from irmiddleware.testing._server import serve_in_thread
from irmiddleware.testing._vllm import VLLMConfig, create_vllm_app

__all__ = ["VLLMConfig", "assert_idle", "create_vllm_app", "serve_in_thread"]
