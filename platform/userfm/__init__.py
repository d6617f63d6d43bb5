"""userfm: user foundation models on Ray.

The pipeline, one subpackage per stage (docs/architecture.md):

    data/        schema, validation, converters, the Ray Data ingest, per-user sequences, synthetic logs
    models/      tokenizer, features, item and user encoders, co-occurrence and MiniLM item vectors
    objectives/  the pretext objectives and their pure losses, one per file
    train/       Ray Train pretraining, early stopping, Ray Tune sweeps, scaling fits
    infer/       frozen embedding tables (embed) and their refresh on new logs
    eval/        downstream tasks, heads, yardsticks, the protocol, metrics, drift
    serve/       the Ray Serve embedding and head deployments
    report/      the HTML run report

``cli`` and ``demo`` (with ``stages``, its stage runner) sit on top; ``config``, ``runtime`` and ``errors`` are shared below every stage.
"""

__version__ = "0.1.0"


def load_encoder(path, device: str = "cpu"):
    """Load an exported user encoder (safetensors + JSON, no pickle, no Ray).

    Returns ``(model in eval mode, vocabs or None, tokenizer or None)``; see ``models.encoders.load_encoder``.
    """
    from userfm.models.encoders import load_encoder as _load  # torch is imported only when a model is loaded

    return _load(path, device=device)
