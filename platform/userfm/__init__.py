"""userfm: user foundation models on Ray.

Stages, one module each: ``schema`` (the canonical event table), ``synth`` (synthetic multi-service
logs), ``convert`` (public formats -> canonical), ``validate`` + ``sequences`` (pure Arrow row checks and
per-user sequence building), ``ingest`` (the Ray Data pipeline that runs them at scale).
"""

__version__ = "0.1.0"
