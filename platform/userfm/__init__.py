"""userfm: user foundation models on Ray.

Stages, one module each: ``schema`` (the canonical event table), ``synth`` (synthetic multi-service
logs), ``convert`` (public formats -> canonical), ``validate`` + ``sequences`` (pure Arrow row checks and
per-user sequence building), ``ingest`` (the Ray Data pipeline that runs them at scale).
"""

__version__ = "0.1.0"


def load_encoder(path, device: str = "cpu"):
    """Load an exported user encoder (safetensors + JSON, no pickle, no Ray).

    Returns ``(model in eval mode, vocabs or None, tokenizer or None)``; see ``encoders.load_encoder``.
    """
    from userfm.encoders import load_encoder as _load  # torch is imported only when a model is loaded

    return _load(path, device=device)
