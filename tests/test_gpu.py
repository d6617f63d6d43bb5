"""The GPU paths on a real CUDA device (``pytest -m gpu``; skipped without one, excluded by default).

Each test compares the GPU result against the same computation on the CPU or in fp32, so a wrong
device move, a lost autocast or a broken pinned-memory copy changes a number here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import ray

    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("gpu")
    generate(SynthConfig(n_users=600, events_per_user=20, seed=3), root / "raw", progress=lambda s: None)
    run_ingest(IngestConfig(inputs=(str(root / "raw" / "events"),), out=str(root / "ds")), progress=lambda s: None)
    yield root
    ray.shutdown()


def test_pinned_copies_reach_the_device_unchanged():
    from userfm.train.worker import _to_device

    nb = {"x": np.arange(12, dtype=np.int64).reshape(3, 4), "y": np.linspace(0, 1, 6, dtype=np.float32)}
    out = _to_device(nb, torch.device("cuda"))
    assert all(t.device.type == "cuda" for t in out.values())
    assert all(np.array_equal(out[k].cpu().numpy(), v) for k, v in nb.items())


def fp32_and_bf16_losses(data: str, device: str) -> tuple[float, float]:
    """The CLUE loss of one featurized training batch in fp32 and under bf16 autocast, same weights."""
    from userfm.models.encoders import UserEncoder, config_for
    from userfm.models.features import trim_events
    from userfm.objectives.pretext import build_head, pretext_loss
    from userfm.train.pretrain import _fit_resources, _read_rows
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.train.steps import _objective_config, featurize
    from userfm.train.worker import _to_device
    from userfm.data.dataset import read_sequences

    cfg = PretrainConfig(data=data, objective="clue", item_encoder="category", size="tiny", max_events=32)
    vocabs, _ = _fit_resources(cfg, _read_rows(data, "train"))
    nb = featurize(read_sequences(data), split="train", objective="clue", vocabs_json=vocabs.to_json(), tokenizer_json=None,
                   vectors_dir=None, max_events=32, single_service="time_split", seed=0)
    nb = trim_events({k: v[:64] for k, v in nb.items()})
    torch.manual_seed(0)
    enc = config_for("tiny", vocabs, item_encoder="category", max_events=32)
    ocfg = _objective_config(cfg)
    model, head = UserEncoder(enc).to(device).eval(), build_head(ocfg, enc).to(device)
    batch = _to_device(nb, torch.device(device))
    with torch.no_grad():
        fp32 = float(pretext_loss(model, head, batch, ocfg)[0])
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = float(pretext_loss(model, head, batch, ocfg)[0])
    return fp32, bf16


def test_bf16_autocast_loss_is_close_to_fp32_on_the_same_batch(dataset):
    fp32, bf16 = fp32_and_bf16_losses(str(dataset / "ds"), "cuda")
    assert np.isfinite(fp32) and fp32 > 1.0  # 64 pairs: chance is log(64) ~ 4.2
    assert abs(bf16 - fp32) < 0.02 * fp32


def test_ray_train_use_gpu_bf16_learns_and_exports(dataset):
    from userfm.train.pretrain import run_pretrain
    from userfm.train.pretrain_config import PretrainConfig

    cfg = PretrainConfig(data=str(dataset / "ds"), out=str(dataset / "run"), objective="clue", item_encoder="text",
                         size="tiny", max_events=32, max_text_tokens=8, text_vocab=512, batch_size=32, lr=3e-3,
                         warmup_steps=2, max_steps=16, log_every=4, eval_every=4, num_workers=1, use_gpu=True,
                         precision="bf16", checkpoint_every=100)
    summary = run_pretrain(cfg, progress=lambda s: None)
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0]
    assert summary["final"]["step"] == 16 and (Path(cfg.out) / "model" / "model.safetensors").is_file()


def test_gpu_embed_actor_matches_the_cpu_embeddings(dataset):
    from userfm.infer.embed import EmbedConfig, read_embeddings, run_embed

    model = str(dataset / "run" / "model")
    if not Path(model).is_dir():
        pytest.skip("needs the model of test_ray_train_use_gpu_bf16_learns_and_exports")
    run_embed(EmbedConfig(model=model, data=str(dataset / "ds"), out=str(dataset / "emb-cpu")), progress=lambda s: None)
    run_embed(EmbedConfig(model=model, data=str(dataset / "ds"), out=str(dataset / "emb-gpu"), gpus=1.0), progress=lambda s: None)
    ids_c, x_c = read_embeddings(dataset / "emb-cpu")
    ids_g, x_g = read_embeddings(dataset / "emb-gpu")
    order = np.argsort(ids_g)[np.argsort(np.argsort(ids_c))]
    assert sorted(ids_c) == sorted(ids_g) and len(ids_c) == 600
    np.testing.assert_allclose(x_g[order], x_c, atol=2e-3, rtol=2e-3)
