"""pretrained("tiny") with a tiny recipe override in a temporary DEEPSEEK_MINI_HOME: build,
cache, reload, determinism, recipe-keyed cache, atomic publish, concurrent builders."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deepseek_mini import paths
from deepseek_mini.pretrained import RECIPES, Recipe, _publish, cache_key, load, pretrained


SMALL_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                   first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                   moe_intermediate_size=16)
FAST = dict(corpus_chars=60_000, vocab_size=300, seq_len=32, batch_size=4, steps=6, warmup_steps=1, lr=1e-2,
            eval_batches=2, model=SMALL_MODEL, progress=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One temporary DEEPSEEK_MINI_HOME for the module, so the tiny build is shared."""
    path = tmp_path_factory.mktemp("deepseek_mini_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPSEEK_MINI_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny(home):
    return pretrained("tiny", **FAST)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_build_cache_and_reload(home, tiny):
    from deepseek_mini.model import DeepseekModel

    assert tiny.path.parent == paths.models_dir() == home / "models"
    assert isinstance(tiny.model, DeepseekModel) and not tiny.model.training
    assert tiny.model.config.n_routed_experts == 4 and tiny.model.config.kv_lora_rank == 16  # MoE + MLA
    assert tiny.tokenizer.vocab_size == 300 == tiny.model.config.vocab_size
    assert "python-stdlib" in tiny.history["corpus"]
    assert tiny.history["final_val_loss"] < tiny.history["initial_val_loss"], "training must lower val loss"
    assert len(tiny.history["train"]) == 6
    # files are readable by others (a workshop's shared cache) and nothing temporary is left
    assert sorted(p.name for p in tiny.path.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "recipe.json", "history.json"])
    assert [p.name for p in (home / "models").iterdir() if "building" in p.name] == []
    umask = os.umask(0)
    os.umask(umask)
    assert tiny.path.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tiny.path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    # second call: loads from the cache (no training) and gives the same weights and outputs
    mtime = (tiny.path / "model.safetensors").stat().st_mtime_ns
    again = pretrained("tiny", **FAST)
    assert (again.path / "model.safetensors").stat().st_mtime_ns == mtime
    for k, v in _weights(tiny.model).items():
        assert torch.equal(v, again.model.state_dict()[k])
    ids = torch.tensor([tiny.tokenizer.encode("def main():\n    return")])
    assert torch.equal(tiny.model(ids), again.model(ids))
    text = "import os\nprint('héllo 😀')\n"
    assert again.tokenizer.decode(again.tokenizer.encode(text)) == text
    assert again.recipe == Recipe(**{k: v for k, v in FAST.items() if k != "progress"})


def test_build_is_deterministic(home, tiny):
    rebuilt = pretrained("tiny", rebuild=True, **FAST)
    assert rebuilt.path == tiny.path
    for k, v in _weights(tiny.model).items():
        assert torch.equal(v, rebuilt.model.state_dict()[k]), f"rebuild changed {k}"
    assert [r["loss"] for r in rebuilt.history["train"]] == [r["loss"] for r in tiny.history["train"]]


def test_the_recipe_and_the_corpus_are_the_cache_key(tiny):
    recipe = Recipe(**{k: v for k, v in FAST.items() if k != "progress"})
    fingerprint = tiny.history["corpus_fingerprint"]
    assert tiny.path.name == f"tiny-{cache_key(recipe, fingerprint)}"
    assert cache_key(recipe, fingerprint) != cache_key(recipe, "another corpus")
    for change in [{"steps": 7}, {"lr": 2e-2}, {"model": {**SMALL_MODEL, "n_routed_experts": 8}}]:
        assert cache_key(Recipe(**{**recipe.__dict__, **change}), fingerprint) != cache_key(recipe, fingerprint)
    assert cache_key(Recipe(**recipe.__dict__), fingerprint) == cache_key(recipe, fingerprint)


def test_publish_is_atomic_and_keeps_the_first_complete_build(tmp_path):
    files = ["config.json", "model.safetensors", "tokenizer.json", "recipe.json", "history.json"]

    def build(name, tag):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_text(tag)
        return d

    final = tmp_path / "tiny-key"
    assert _publish(build("a", "first"), final, replace=False)
    b = build("b", "second")
    assert not _publish(b, final, replace=False)  # a concurrent builder lost the race
    assert (final / "config.json").read_text() == "first" and b.is_dir()
    assert _publish(b, final, replace=True)  # rebuild replaces
    assert (final / "config.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-key"]


@pytest.mark.slow
def test_concurrent_builders_do_not_corrupt_the_cache(tmp_path):
    home = tmp_path
    script = textwrap.dedent(f"""
        import json, sys
        from deepseek_mini.pretrained import pretrained
        tiny = pretrained("tiny", **json.loads(sys.argv[1]))
        print(tiny.path, sum(float(v.double().sum()) for v in tiny.model.state_dict().values()))
    """)
    env = {**os.environ, "DEEPSEEK_MINI_HOME": str(home), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(FAST)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(paths.REPO_ROOT)) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    lines = [out.strip() for out, _ in outs]
    assert lines[0] == lines[1], "both builders must end with the same model"
    entries = sorted(p.name for p in (home / "models").iterdir())
    assert len([e for e in entries if not e.startswith(".")]) == 1
    assert not [e for e in entries if "building" in e or "-old-" in e]


def test_bad_arguments(home):
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        pretrained("huge")
    with pytest.raises(ValueError, match=r"unknown recipe fields \['stepz'\]"):
        pretrained("tiny", stepz=3)
    with pytest.raises(FileNotFoundError, match="not a complete pretrained model folder"):
        load(home)
    assert "tiny" in RECIPES and RECIPES["tiny"].model["n_routed_experts"] > 0
