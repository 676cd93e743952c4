"""Keeping modules that vLLM imports but never uses out of the engine's two processes.

- On a CPU host, torch and vLLM import triton only to find it has no CPU backend and turn it
  off ("Triton is installed, but doesn't include CPU backend. Disabling Triton.").
- vLLM's request tracing imports OpenTelemetry and gRPC whether or not tracing is configured
  (this service never configures it). With triton: ~85 MB of resident memory in the engine
  worker and as much again in its EngineCore (measured: 572 → 488 MB after importing AsyncLLM).
- transformers imports scikit-learn when it is installed (for assisted generation's candidate
  generator, which vLLM does not use), and with it pandas and pyarrow, and scipy (for
  object-detection losses); vLLM imports OpenCV for video input, which a text model never
  gets. Where they are installed (lm-eval brings the first four into this project's venv, and
  many ML hosts have them): 137 MB in each process, and OpenCV 15 MB more (measured:
  639 → 487 MB after importing AsyncLLM and transformers' modelling code).

Every such import is guarded (`try: import ...`, `find_spec`), and a name set to None in
`sys.modules` makes its import fail with ImportError and `find_spec` return None, so vLLM and
transformers take the path they take without them anyway.

The engine worker names the modules in CITADEL_UNUSED_MODULES (settings.prepare_environment).
vLLM starts the EngineCore with multiprocessing's spawn method, and a spawned child runs its
parent's main module (`service.cli`, directly or through the console script) before it imports
vLLM: `skip_unused_modules()` at the top of `service.cli` covers the EngineCore too.
"""

from __future__ import annotations

import os
import sys

ENV = "CITADEL_UNUSED_MODULES"
UNUSED = ("opentelemetry", "sklearn", "scipy", "cv2")
UNUSED_ON_CPU = ("triton",)


def skip_unused_modules() -> None:
    """Make the modules named in CITADEL_UNUSED_MODULES fail to import."""
    for name in filter(None, os.environ.get(ENV, "").split(",")):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # one already imported stays
