from dataclasses import dataclass

import pytest

from userfm.config import ConfigError, from_dict, load_config, parse_overrides


@dataclass(frozen=True)
class Cfg:
    n: int = 1
    lr: float = 0.1
    name: str = "x"
    flag: bool = False
    services: tuple[str, ...] | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)


def test_precedence_defaults_yaml_explicit_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("n: 5\nlr: 0.5\nname: fromyaml\n")
    cfg = load_config(Cfg, y, ["lr=0.25", "services=shopping,news"], name="explicit", flag=None)
    assert cfg == Cfg(n=5, lr=0.25, name="explicit", flag=False, services=("shopping", "news"))


def test_coercion_of_set_strings():
    cfg = from_dict(Cfg, parse_overrides(["n=3", "flag=true", "split=[0.5, 0.25, 0.25]", "services=none"]))
    assert (cfg.n, cfg.flag, cfg.split, cfg.services) == (3, True, (0.5, 0.25, 0.25), None)


@pytest.mark.parametrize(
    "pairs, match",
    [
        (["nope=1"], r"unknown key\(s\) \['nope'\]"),
        (["n=1.5"], "n: expected an integer, got '1.5'"),
        (["flag=maybe"], "flag: expected true/false"),
        (["lr=fast"], "lr: expected a number"),
        (["n"], "--set expects key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(pairs, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Cfg, None, pairs)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Cfg, bad)


def test_shipped_configs_load_into_their_dataclasses():
    from pathlib import Path

    from userfm.data.ingest import IngestConfig
    from userfm.data.synth_model import SynthConfig

    root = Path(__file__).resolve().parents[1] / "experiments"
    ingest = load_config(IngestConfig, root / "ingest" / "default.yaml", ["out=x"])
    assert ingest == IngestConfig(out="x")  # the file documents the defaults, and must stay in sync
    synth = load_config(SynthConfig, root / "synth" / "default.yaml")
    assert synth.services == ("shopping", "search", "news")


@pytest.mark.parametrize("name", ["mlm", "simclr", "clue", "gpu-cluster"])
def test_shipped_pretrain_configs_load(name):
    from pathlib import Path

    from userfm.train.pretrain_config import PretrainConfig

    cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "experiments" / "pretrain" / f"{name}.yaml")
    assert cfg.objective == ("clue" if name == "gpu-cluster" else name)
    assert cfg.batch_size * cfg.num_workers >= 64  # contrastive batches worth the name
