"""Run-config loading: reference YAML unchanged, our additions, overrides, errors, built-ins."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from srp_jax.config import (
    RunConfig,
    apply_overrides,
    builtin_config_path,
    load_run_config,
    parse_override_value,
    run_config_from_dict,
)
from srp_jax.errors import ConfigError, SrpError

REF = Path(__file__).parent / "fixtures" / "reference_configs"
REPO = Path(__file__).resolve().parents[1]


def test_reference_smoke_config_loads_unchanged():
    cfg = load_run_config(REF / "smoke.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.run.seed == 7 and cfg.init_seed == 7 and cfg.data_seed == 7
    assert cfg.factorizer.architecture == "matryoshka_topk"
    assert cfg.factorizer.k_values == (16, 32, 64) and cfg.factorizer.matryoshka_weights == (3.0, 2.0, 1.0)
    assert cfg.training.steps == 80 and cfg.training.row_sampling == "top1_sqrt_frequency"
    assert cfg.training.checkpoint_every == 500  # reference default when absent
    assert cfg.data.max_hidden == 256 and cfg.data.val_hidden == 96 and cfg.data.max_rows == 4096
    assert cfg.evaluation.k == 32
    # shipped-trainer defaults for the paper-recipe switches
    assert (cfg.training.init_mode, cfg.training.lr_schedule, cfg.training.lambda_mode) == ("random", "constant", "constant")
    assert cfg.training.auxk_coeff == 0.0
    # the merged mapping is the file itself (inert keys kept verbatim)
    assert cfg.to_dict() == yaml.safe_load((REF / "smoke.yaml").read_text())


def test_reference_paper_config_loads_with_data_path(tmp_path):
    cfg = load_run_config(REF / "paper_phase2_base.yaml", data_path=str(tmp_path / "hLN.pt"), out_dir=str(tmp_path))
    assert cfg.data.path == str(tmp_path / "hLN.pt") and cfg.run.output_dir == str(tmp_path)
    assert cfg.data.fallback == "error" and cfg.data.max_rows is None
    assert cfg.factorizer.d_features == 65536 and cfg.factorizer.k == 256
    assert cfg.training.lambda_prism == pytest.approx(1e-3) and cfg.training.code_l2 == pytest.approx(1e-6)
    assert cfg.score_thresholds.max_dead_feature_rate == 0.5
    assert cfg.training.warmup_steps == 1000  # 5% of 20000 by default


def test_val_hidden_and_max_hidden_use_or_defaults():
    base = {"factorizer": {}, "training": {}}
    cfg = run_config_from_dict({**base, "data": {"max_hidden": 0, "val_hidden": None}})
    assert cfg.data.max_hidden == 512 and cfg.data.val_hidden == 128
    cfg = run_config_from_dict({**base, "data": {"max_hidden": 100}})
    assert cfg.data.val_hidden == 100


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.stepz=3", "stepz"),
        ("data.fallback=maybe", "data.fallback"),
        ("training.lr_schedule=cosine", "training.lr_schedule"),
        ("training.row_sampling=zipf", "zipf"),
        ("mesh.data=0", "mesh.data"),
        ("mesh.pipeline=2", "pipeline"),
        ("training.l0_controller.gain=1", "gain"),
        ("factorizer.architecture=moe", "moe"),
        ("training.steps=1.5", "training.steps"),
        ("bogus.key=1", "bogus"),
        ("training.row_sampling=frequency_pow_1.2.3", "frequency_pow_1.2.3"),
        ("training.row_sampling=hybrid_1.2.3freq_1uniform", "hybrid_1.2.3freq"),
        ("factorizer.k_values=5", "factorizer.k_values must be a list"),
        ("factorizer.matryoshka_weights=3", "factorizer.matryoshka_weights must be a list"),
    ],
)
def test_bad_keys_and_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config(REF / "smoke.yaml", [override])
    assert fragment in str(info.value)
    assert isinstance(info.value, SrpError) and isinstance(info.value, ValueError)


def test_unknown_training_key_message_names_block():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in training: stepz"):
        load_run_config(REF / "smoke.yaml", ["training.stepz=3"])


@pytest.mark.parametrize("key", ["grid", "output_root", "fixed"])
def test_sweep_templates_rejected(key):
    with pytest.raises(ConfigError, match=key):
        run_config_from_dict({key: {}, "factorizer": {}, "training": {}})


def test_required_blocks():
    with pytest.raises(ConfigError, match="factorizer"):
        run_config_from_dict({"training": {}})
    with pytest.raises(ConfigError, match="training"):
        run_config_from_dict({"factorizer": {}})


def test_override_value_coercion():
    assert parse_override_value("null") is None and parse_override_value("~") is None
    assert parse_override_value("true") is True and parse_override_value("False") is False
    assert parse_override_value("12") == 12 and isinstance(parse_override_value("12"), int)
    assert parse_override_value("1e-3") == pytest.approx(1e-3)
    assert parse_override_value("[16, 32]") == [16, 32]
    assert parse_override_value("hybrid_50freq_50uniform") == "hybrid_50freq_50uniform"
    merged = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c.d=x"])
    assert merged == {"a": {"b": 2, "c": {"d": "x"}}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_paper_recipe_keys_and_mesh_accepted():
    cfg = load_run_config(
        REF / "smoke.yaml",
        ["training.init_mode=row_seeded", "training.lr_schedule=warmup_cosine", "training.lr_warmup_steps=4",
         "training.lambda_mode=delayed_ramp", "training.auxk_coeff=0.03", "training.auxk_k=8",
         "mesh.data=-1", "mesh.model=2", "artifacts.export_pt=true", "artifacts.make_figures=true",
         "autoresearch.score_thresholds.max_dead_feature_rate=0.5"],
    )
    assert cfg.training.warmup_steps == 4 and cfg.training.auxk_k == 8 and cfg.mesh.model == 2
    assert cfg.artifacts.export_pt is True and cfg.score_thresholds.max_dead_feature_rate == 0.5


def test_builtin_configs_all_load():
    names = ["smoke", "smollm2-cpu", "smollm2-cpu-paper"] + [
        f"paper/{p.parent.name}/{p.stem}" for p in sorted((REPO / "configs" / "paper").glob("*/*.yaml"))
    ]
    assert len(names) == 20
    for name in names:
        assert builtin_config_path(name) is not None, name
        cfg = load_run_config(name)
        assert cfg.factorizer.architecture == "topk" or name == "smoke"
    q = load_run_config("paper/qwen3.5-2b/k256_32x")
    assert (q.factorizer.d_features, q.factorizer.k) == (65536, 256)
    assert (q.training.init_mode, q.training.lambda_mode, q.training.row_sampling) == (
        "row_seeded", "delayed_ramp", "hybrid_50freq_50uniform")
    m16 = load_run_config("paper/ministral-3-8b/k128_16x")
    assert (m16.factorizer.d_features, m16.training.init_mode, m16.training.lambda_mode) == (65536, "random", "constant")
    m32 = load_run_config("paper/ministral-3-8b/k256_32x")
    assert (m32.training.init_mode, m32.training.lambda_mode) == ("row_seeded", "constant")
    s = load_run_config("smollm2-cpu")
    assert s.data.path == "${SRP_SMOLLM2_PAYLOAD}" and s.data.fallback == "error"
    # the paper variant differs from it in the recipe keys only (and the run's name / folder)
    p, sd = load_run_config("smollm2-cpu-paper").to_dict(), s.to_dict()
    recipe = {"init_mode": "row_seeded", "row_seeded_scale": "least_squares", "lr_schedule": "warmup_cosine",
              "lr_warmup_steps": 50, "final_lr_frac": 0.1, "lambda_mode": "delayed_ramp", "lambda_ramp_start_frac": 0.0}
    assert {key: p["training"][key] for key in recipe} == recipe
    for block in sd:
        for key in sd[block] if isinstance(sd[block], dict) else ():
            if block == "training" and key in recipe or block == "run" and key in ("name", "output_dir"):
                continue
            assert p[block][key] == sd[block][key], (block, key)
    # the shipped smoke.yaml is the reference smoke config (plus comments)
    assert load_run_config("smoke").to_dict() == load_run_config(REF / "smoke.yaml").to_dict()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such config"):
        load_run_config("/nonexistent/cfg.yaml")
