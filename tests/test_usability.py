"""Issue 13: the CLI as a researcher uses it (config names, validation at the edge, start-up, run folders)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pfdiff_bench.cli import main
from pfdiff_bench.config import CONFIG_DIR, bundled_configs, load_config, resolve_path

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args):
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_one_line_error(code, err, needle):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


# ------------------------------------------------------------------ (1) bundled config by bare name
@pytest.mark.parametrize("name", ["imagenet64", "imagenet64.yaml", "imagenet64.yml", "toy.yaml"])
def test_bare_config_name_resolves_to_bundled(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here: the bundled one must be found
    stem = name.split(".")[0]
    assert resolve_path(name) == CONFIG_DIR / f"{stem}.yaml"
    assert load_config(name)["name"] == stem


def test_existing_path_wins_over_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = yaml.safe_load((CONFIG_DIR / "toy.yaml").read_text())
    mine["sampling"]["nfe"] = 7
    Path("toy.yaml").write_text(yaml.safe_dump(mine))
    assert resolve_path("toy.yaml") == Path("toy.yaml")  # the file in the working directory
    assert load_config("toy.yaml")["sampling"]["nfe"] == 7
    assert resolve_path("toy") == CONFIG_DIR / "toy.yaml"  # "toy" is not a path here: the bundled one
    assert load_config("toy")["sampling"]["nfe"] != 7


def test_missing_config_lists_bundled_names(capsys, tmp_path):
    code, _, err = cli(capsys, "sample", "--config", "imagenet46.yaml", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "config file not found")
    for name in bundled_configs():
        assert name in err
    assert {"toy", "imagenet64", "cifar10"} <= set(bundled_configs())


# ------------------------------------------------------------------ (4) every field typed and ranged
def _write(tmp_path, edit):
    cfg = yaml.safe_load((CONFIG_DIR / "toy.yaml").read_text())
    edit(cfg)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["model"].update(components=0), "'model.components' must be at least 1"),
    (lambda c: c["model"].update(shape=[3, "a", 8]), "'model.shape' must be a non-empty list of positive integers"),
    (lambda c: c["model"].update(shape=[]), "'model.shape' must be a non-empty list"),
    (lambda c: c["model"].update(shape=[3, 0, 8]), "'model.shape'"),
    (lambda c: c["model"].update(std=-0.1), "'model.std' = -0.1 is out of range; accepted: (0, inf)"),
    (lambda c: c["model"].update(std=0), "'model.std'"),
    (lambda c: c["sampler"].update(order=5), "'sampler.order' = 5 is out of range; accepted: [1, 4]"),
    (lambda c: c["sampler"].update(eta=-1), "'sampler.eta' must be at least 0"),
    (lambda c: c["schedule"].update(beta_end=1.5), "'schedule.beta_end' = 1.5 is out of range"),
    (lambda c: c["schedule"].update(num_steps=1), "'schedule.num_steps' must be at least 2"),
    (lambda c: c["sampling"].update(seed=-3), "'sampling.seed'"),
    (lambda c: c["schedule"].update(type="linear", beta_start=0.02, beta_end=0.0001), "must be >= 'schedule.beta_start'"),
])
def test_bad_field_is_one_line_exit_2(edit, needle, capsys, tmp_path):
    path = _write(tmp_path, edit)
    code, _, err = cli(capsys, "sample", "--config", path, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r").exists()


def test_empty_yaml_is_refused(capsys, tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing here\n")
    code, _, err = cli(capsys, "sample", "--config", str(p), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "the config is empty")


def test_bad_cli_option_is_ranged_too(capsys, tmp_path):
    code, _, err = cli(capsys, "sample", "--order", "7", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "'sampler.order' = 7 is out of range")


# ------------------------------------------------------------------ (3) start-up without torch
# `reproduce TABLE --dry-run` still imports torch: the cells' grids come from the torch schedule code
# (schedules.py, grids.py, samplers/plan.py), the one implementation the runs use (docs/PERFORMANCE.md §7).
@pytest.mark.parametrize("args", [["--help"], ["sample", "--help"], ["reproduce", "--help"], ["models", "--help"],
                                  ["--version"], ["models", "list"]])
def test_help_does_not_import_torch(args):
    code = ("import sys\nfrom pfdiff_bench.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'numpy', 'matplotlib', 'diffusers', 'scipy') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr


# ------------------------------------------------------------------ one missing-checkpoint check for sample and reproduce
def test_missing_checkpoints_names_each_file_with_its_fetch_hint(tmp_path, monkeypatch):
    from pfdiff_bench.models import zoo

    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    cfg = load_config("imagenet64")  # UNet + classifier guidance
    unet, clf = zoo.cache_path("adm_imagenet64"), zoo.cache_path("adm_classifier64")
    assert zoo.missing_checkpoints(cfg) == [
        f"checkpoint {n} is missing: run `pfdiff-bench models download {n}` or fetch {zoo.CHECKPOINTS[n].url} "
        f"and place it at {p}" for n, p in (("adm_imagenet64", unet), ("adm_classifier64", clf))]
    unet.parent.mkdir(parents=True)
    unet.write_bytes(b"")
    (item,) = zoo.missing_checkpoints(cfg)
    assert item.startswith("checkpoint adm_classifier64 is missing")
    mine = tmp_path / "mine.pt"  # a path given in the config is looked for there, not in the cache
    cfg["model"]["checkpoint_path"] = str(mine)
    first = zoo.missing_checkpoints(cfg)[0]
    assert first.endswith(f"place it at {mine} (the path given for it)") and "models download" not in first
    calls = []

    def fake_download(name, **kw):  # fetch=True downloads what has a link; only failures are listed
        calls.append(name)
        zoo.cache_path(name).write_bytes(b"x")
        return zoo.cache_path(name)

    monkeypatch.setattr(zoo, "download", fake_download)
    assert zoo.missing_checkpoints(load_config("imagenet64"), fetch=True) == [] and calls == ["adm_classifier64"]
    assert zoo.missing_checkpoints(load_config("toy"), fetch=True) == []  # analytic: nothing to fetch


def test_sample_and_reproduce_share_the_missing_checkpoint_check(capsys, tmp_path, monkeypatch):
    from pfdiff_bench.models import zoo

    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(zoo, "missing_checkpoints", lambda cfg, **kw: ["SENTINEL: fetch X and place it at Y"])
    code, _, err = cli(capsys, "sample", "--config", "imagenet64", "--nfe", "4", "--allow-cpu",
                       "--out", str(tmp_path / "r"))
    assert code == 2 and "error: 1 checkpoint file is missing\n  - SENTINEL: fetch X and place it at Y\n" in err, err
    code, _, err = cli(capsys, "reproduce", "table2", "--allow-cpu", "--out", str(tmp_path / "t2"))
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error: cannot run table2 here: ") and lines[0].endswith("missing"), err
    assert "  - SENTINEL: fetch X and place it at Y" in lines and not (tmp_path / "t2" / "runs").exists(), err


# ------------------------------------------------------------------ (5) full-size networks on a CPU
@pytest.fixture
def offline_zoo(monkeypatch, tmp_path):
    import torch

    from pfdiff_bench.errors import CheckpointError
    from pfdiff_bench.models import zoo

    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def offline(name, *a, **k):
        raise CheckpointError(zoo._offline_message(zoo.get_spec(name), zoo.cache_path(name), "offline"))

    monkeypatch.setattr(zoo, "download", offline)


def test_full_size_network_on_cpu_needs_allow_cpu(capsys, tmp_path, offline_zoo):
    code, _, err = cli(capsys, "sample", "--config", "imagenet64", "--nfe", "4", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "pass --allow-cpu")
    assert "full-size adm network" in err and not (tmp_path / "r").exists()


def test_every_missing_checkpoint_is_named_at_once(capsys, tmp_path, offline_zoo):
    code, _, err = cli(capsys, "sample", "--config", "imagenet64", "--nfe", "4", "--allow-cpu",
                       "--out", str(tmp_path / "r"))
    lines = err.strip().splitlines()
    assert lines[0].startswith("warning: sampling a full-size network on the CPU")
    assert code == 2 and lines[1] == "error: 2 checkpoint files are missing", err  # then one line per file
    assert len(lines) == 4 and "64x64_diffusion.pt" in lines[2] and "64x64_classifier.pt" in lines[3], err
    assert all(line.startswith("  - cannot download ") and "place the file" in line for line in lines[2:]), err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ (7) run folders: names, refusals, extension
def _samples(run):
    from pfdiff_bench.sampling.rundir import read_manifest

    import torch

    man = read_manifest(run)
    shards = sorted(Path(run).glob("shard-*.pt"))
    xs = torch.cat([torch.load(p, weights_only=True)["samples"] for p in shards])
    return man, xs


def test_default_out_names_grid_seed_and_count(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "sample", "--config", "toy", "--nfe", "4", "--pfdiff", "2,1", "-n", "3",
                         "--seed", "5", "--grid", "quad", "--no-progress")
    assert code == 0, err
    runs = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 1 and runs[0].endswith("-quad-nfe4-seed5-n3"), runs


def test_refusal_names_the_differing_fields(capsys, tmp_path):
    run = str(tmp_path / "r")
    assert cli(capsys, "sample", "--nfe", "4", "-n", "3", "--out", run, "--no-progress")[0] == 0
    code, _, err = cli(capsys, "sample", "--nfe", "4", "-n", "3", "--seed", "9", "--eta", "0.5", "--out", run)
    assert_one_line_error(code, err, "holds another run; it differs in ")
    assert "seed (there 0, here 9)" in err
    assert "sampler.eta (there 0.0, here 0.5)" in err
    assert "num_samples" not in err  # the same count: not named
    code, _, err = cli(capsys, "sample", "--nfe", "6", "-n", "3", "--grid", "quad", "--out", run)
    assert_one_line_error(code, err, "nfe (there 4, here 6), grid (there uniform, here quad)")


def test_finished_run_extends_with_identical_first_samples(capsys, tmp_path):
    small, big, ref = str(tmp_path / "small"), str(tmp_path / "big"), str(tmp_path / "ref")
    common = ["sample", "--nfe", "4", "--pfdiff", "2,1", "--shard-size", "4", "--no-progress"]
    assert cli(capsys, *common, "-n", "6", "--out", small)[0] == 0  # last shard partial (2 of 4)
    code, _, err = cli(capsys, *common, "-n", "10", "--out", small)
    assert code == 0, err
    assert "extending" in err and "from 6 to 10 samples" in err
    assert cli(capsys, *common, "-n", "10", "--out", ref)[0] == 0
    man, xs = _samples(small)
    man_ref, xs_ref = _samples(ref)
    assert man["complete"] and man["num_samples"] == 10 and xs.shape[0] == 10
    assert (xs == xs_ref).all()  # extension == a fresh 10-sample run: the first 6 unchanged
    assert man["fingerprint"] == man_ref["fingerprint"]
    code, _, err = cli(capsys, *common, "-n", "5", "--out", small)
    assert_one_line_error(code, err, "holds 10 samples of this run and this command asks for 5")
    del big


# ------------------------------------------------------------------ (2) your own weights of a known architecture
def test_own_checkpoint_runs_and_is_recorded_as_not_the_papers(capsys, tmp_path, monkeypatch):
    import hashlib

    import torch

    from pfdiff_bench.models import zoo

    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    net = zoo.build_network("ema_cifar10")  # official layout, random weights: "a retrained CIFAR-10 model"
    own = tmp_path / "my_cifar10.pt"
    torch.save(net.state_dict(), own)
    run = tmp_path / "run"
    code, out, err = cli(capsys, "sample", "--config", "cifar10", "--checkpoint", str(own), "--allow-cpu",
                         "--device", "cpu", "-n", "1", "--nfe", "2", "--out", str(run), "--no-progress")
    assert code == 0, err
    assert "is not the published ema_cifar10 checkpoint" in err and "not the paper's checkpoint" in err
    from pfdiff_bench.sampling.rundir import read_manifest

    w = read_manifest(run)["weights"]
    assert w["paper_checkpoint"] is False and w["sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
    # keys and shapes are still checked: a file of another layout is refused in one line
    sd = net.state_dict()
    sd.pop(next(iter(sd)))
    torch.save(sd, own)
    code, _, err = cli(capsys, "sample", "--config", "cifar10", "--checkpoint", str(own), "--allow-cpu",
                       "--device", "cpu", "-n", "1", "--nfe", "2", "--out", str(tmp_path / "run2"))
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not fit ema_cifar10" in last and "1 missing keys" in last, err


def test_python_model_type_runs_through_the_engine(capsys, tmp_path, monkeypatch):
    import torch

    from pfdiff_bench.samplers import run_sampler
    from pfdiff_bench.sampling.setup import build

    (tmp_path / "my_eps_pkg.py").write_text(
        "import torch\n"
        "def factory(scale=1.0):\n"
        "    def eps(x, t, y=None):\n"
        "        return scale * torch.tanh(x)\n"
        "    return eps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {"name": "mine", "model": {"type": "python", "target": "my_eps_pkg:factory", "kwargs": {"scale": 0.3},
                                     "shape": [2, 5]},
           "schedule": {"type": "linear"}, "sampler": {"pfdiff": "2,1"}, "sampling": {"nfe": 4, "device": "cpu"}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code, _, err = cli(capsys, "sample", "--config", str(path), "-n", "3", "--out", str(run), "--no-progress")
    assert code == 0, err
    rec = torch.load(next(run.glob("shard-*.pt")), weights_only=True)
    setup = build(load_config(str(path)))
    x_T = rec["x_T"].to(torch.float32)
    ref = run_sampler(setup.plan, lambda x, t, y=None: 0.3 * torch.tanh(x), setup.schedule, x_T)
    assert torch.allclose(rec["samples"].to(torch.float32), ref.x.to(torch.float32), atol=1e-6)
    assert not torch.allclose(ref.x, x_T)  # the model did something
    bad = yaml.safe_dump({**cfg, "model": {"type": "python", "shape": [2, 5]}})
    path.write_text(bad)
    code, _, err = cli(capsys, "sample", "--config", str(path), "--out", str(tmp_path / "r2"))
    assert_one_line_error(code, err, "model type python needs 'model.target'")


# ------------------------------------------------------------------ README examples that need no download
def _readme_blocks(lang):
    import re

    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_python_plan_and_schedule_example_runs():
    block = next(b for b in _readme_blocks("python") if "run_sampler(p, eps" in b)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["out"].nfe == 4 and ns["out"].x.shape == (8, 3, 32, 32)


def test_readme_toy_sample_commands_run(capsys, tmp_path, monkeypatch):
    import shlex

    monkeypatch.chdir(tmp_path)
    cmds = [line.split("#")[0].strip() for b in _readme_blocks("bash") for line in b.splitlines()]
    toy = [c for c in cmds if c.startswith("pfdiff-bench sample --config toy")]
    assert len(toy) >= 3, toy
    for c in toy:
        args = shlex.split(c)[1:]
        args = [a if a not in ("1000", "2000") else str(int(a) // 100) for a in args]  # same commands, 100x fewer
        code, _, err = cli(capsys, *args, "--no-progress")
        assert code == 0, (c, err)
    assert (tmp_path / "runs" / "toy-pf21").is_dir()


# ------------------------------------------------------------------ (8) the exact reference is solved once
def test_exact_reference_is_reused_across_cells(capsys, tmp_path, monkeypatch):
    from pfdiff_bench.evaluation import exact
    from pfdiff_bench.models.analytic import GaussianMixture

    monkeypatch.setattr(exact, "_REFERENCE_CACHE", {})
    calls = []
    real = GaussianMixture.reference_solution

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(GaussianMixture, "reference_solution", counting)
    runs = []
    for i, pf in enumerate(["none", "2,1", "1,1"]):  # three cells: same x_T, same start/end times
        run = str(tmp_path / f"r{i}")
        assert cli(capsys, "sample", "--nfe", "4", "--pfdiff", pf, "-n", "5", "--out", run, "--no-progress")[0] == 0
        runs.append(run)
    results = [exact.evaluate_run(r) for r in runs]
    assert len(calls) == 1, len(calls)
    exact._REFERENCE_CACHE.clear()
    fresh = exact.evaluate_run(runs[2])  # solved again from scratch: the cached value was the same
    assert len(calls) == 2 and fresh["rms"] == results[2]["rms"]
    assert len({r["rms"] for r in results}) == 3  # the cells differ; only the reference is shared


# ------------------------------------------------------------------ (11) fid checks its input first
def test_fid_checks_the_input_path_before_inception_weights(capsys, tmp_path, monkeypatch):
    from pfdiff_bench.evaluation import features

    def no_weights(*a, **k):
        raise AssertionError("Inception weights looked up before the input path was checked")

    monkeypatch.setattr(features, "resolve_inception_weights", no_weights)
    code, _, err = cli(capsys, "fid", str(tmp_path / "no-such-run"), "--offline")
    assert_one_line_error(code, err, "no-such-run does not exist")
