"""tools/gpu_check.sh and tools/gpu_check.py: the GPU measurement's plan fits its 8-minute budget in
the order of value, and `--dry-run` takes every step of it at tiny sizes on the CPU, so that the script
cannot rot between the rare GPU windows. The dry run hides the Debian photo packages (the GPU machine
has none): its data path is missing and convert.py photos fails, so it also checks the synthetic-JPEG
fallback. A bare python (no torch) still gets the preflight line and every step's row."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import bench

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
FILES = {"gpu_check.md", "gpu_check.json", "gpu_check.log", "augment.json", "model.json", "train.json",
         "augment.png", "train.png"}
# the order of value (issue 22): the environment, the compiled mscn augment, end to end and model-only
# for SimCLR and BYOL, the sync checks; then the rest
FIRST = ["environment", "augment-compiled-mscn", "photos", "train-simclr", "train-byol", "syncs-simclr-mscn",
         "syncs-byol-mixmask"]


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(*flags: str) -> dict[str, int]:
    done = subprocess.run(["bash", str(SCRIPT), "--plan", *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {name: int(limit) for name, limit in (line.split("\t") for line in done.stdout.splitlines())}


def test_the_plan_fits_eight_minutes_in_the_order_of_value():
    plan = _plan()
    budget, summary = plan.pop("budget"), plan.pop("summary")
    assert budget == 480 and sum(plan.values()) + summary <= budget
    assert list(plan)[:len(FIRST)] == FIRST
    assert plan["augment-compiled-mscn"] >= 180           # a cold inductor compile of MSCN's stencils
    assert list(plan).index("cuda-tests") < list(plan).index("augment-compiled-rest") == len(plan) - 1
    assert plan["augment-compiled-rest"] == 0              # runs only on time the others left
    dry = _plan("--dry-run")
    assert dry.pop("budget") == 6 * budget and dry.pop("summary") == 6 * summary
    assert list(dry) == list(plan) and all(dry[k] == 6 * v for k, v in plan.items())


def test_script_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: tools/gpu_check.sh [--dry-run] [--plan]" in done.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_PHOTO_ROOT": str(out / "no-debian-packages-here")}
    for key in ("MASKSIAM_DEVICE", "GPU_CHECK_DATA", "GPU_CHECK_PYTHON", "GPU_CHECK_BUDGET_S"):
        env.pop(key, None)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    return out, done


@pytest.mark.slow
def test_dry_run_takes_every_step_of_the_plan_and_writes_its_files(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stderr[-3000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith("[gpu_check] preflight: imports torch")
    assert "does not import" in first or first.endswith("; nothing missing")
    assert {p.name for p in out.iterdir()} == FILES
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["budget_s"] == 2880 and summary["preflight"] == first
    assert summary["environment"]["torch"] and summary["environment"]["imports"]["masksiam"] == "ok"
    plan = _plan("--dry-run")
    steps = summary["steps"]
    assert [s["step"] for s in steps] == [k for k in plan if k not in ("summary", "budget")]
    assert all(s["exit"] == "0" for s in steps), steps
    assert all(int(s["limit"]) == plan[s["step"]] for s in steps)
    # the photo packages hidden: convert.py photos failed and the synthetic JPEGs stood in
    assert "synthetic JPEGs (convert.py photos failed: photo folder" in (out / "gpu_check.log").read_text()
    md = (out / "gpu_check.md").read_text().splitlines()        # and the summary says so
    assert md[2] == first and md[4].startswith("Data: ") and ": synthetic JPEGs (convert.py photos failed" in md[4]


@pytest.mark.slow
def test_dry_run_rows_per_mode(dry_run):
    out, _ = dry_run
    results = json.loads((out / "gpu_check.json").read_text())["results"]
    augment = results["augment"]
    assert [r["label"] for r in augment] == ["mscn compiled", "mscn", "simclr", "byol", "mixmask", "simmim_8px",
                                             "simclr compiled"]
    assert [r["views_per_image"] for r in augment] == [3, 3, 2, 2, 3, 1, 2]
    assert [r["label"] for r in results["model"]] == ["model-only simmim"]
    assert [r["label"] for r in results["train"]] == ["simclr: end-to-end (torchvision)", "simclr: model-only",
                                                      "byol: end-to-end (torchvision)", "byol: model-only"]
    assert [r["recipe"] for r in results["train"]] == ["mscn", "model-only-mscn", "byol", "model-only-byol"]
    assert all(r["device"] == "cpu" and r["images_per_s"] > 0 for m in ("model", "train") for r in results[m])
    assert [(r["label"], r["ok"]) for r in results["syncs"]] == [("simclr + mscn", True), ("byol + mixmask", True)]
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# tools/gpu_check.sh --dry-run") and "## Host syncs in the step path" in md
    for mode in ("augment", "model", "train"):       # bench.py's own payload format
        payload = json.loads((out / f"{mode}.json").read_text())
        assert payload["mode"] == mode and payload["results"] and payload["table"] in md


@pytest.mark.slow
def test_readme_takes_the_gpu_check_folder(dry_run, tmp_path):
    out, _ = dry_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.BEGIN}\nold\n{bench.END}\n")
    res = bench.main(["readme", "--results", f"{out},{out}", "--readme", str(readme)])
    assert res["written"] and res["block"].count("Measured by tools/gpu_check.sh --dry-run") == 2
    assert "| augment: mscn compiled batched vs per-sample |" in res["block"]
    assert "| train: simclr: end-to-end (torchvision) |" in res["block"]
    assert "| train: model-only simmim |" in res["block"]


def test_a_python_without_torch_still_gets_the_preflight_line_and_every_row(tmp_path):
    """python -S: no site-packages, so no torch, numpy or PIL. Nothing can run; every step says why."""
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_PYTHON": str(bare), "GPU_CHECK_DATA": str(tmp_path / "none")}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("[gpu_check] preflight: imports ") and "torch (ModuleNotFoundError)" in first
    summary = json.loads((out / "gpu_check.json").read_text())
    plan = _plan()
    assert [s["step"] for s in summary["steps"]] == [k for k in plan if k not in ("summary", "budget")]
    env_row, *rest = summary["steps"]
    assert env_row["exit"] == "0"
    for s in rest:
        assert s["exit"] == "skipped" and "does not import: ModuleNotFoundError" in s["note"], s
    assert "bench.py does not import" in (out / "gpu_check.md").read_text()
    assert {p.name for p in out.iterdir()} == {"gpu_check.md", "gpu_check.json", "gpu_check.log"}


# ---- tools/gpu_check.py photos: the JPEG folder -----------------------------------------------------

def _jpegs(folder: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted(folder.iterdir())}


def test_photos_without_the_packages_are_synthetic_jpegs_of_varied_sizes(tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "photos"
    tool.main(["photos", "--out", str(out), "--preset", "dry", "--photo-root", str(tmp_path / "none"),
               "--workers", "1"])
    assert "synthetic JPEGs (convert.py photos failed: photo folder" in capsys.readouterr().out
    preset = tool.PRESETS["dry"]
    for split, n in (("train", preset["train_per_class"]), ("val", preset["val_per_class"])):
        classes = _jpegs(out / split)
        assert len(classes) == preset["classes"] and all(len(files) == n for files in classes.values())
    sizes, means = set(), []
    for path in (out / "train").rglob("*.jpg"):
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= preset["max_res"]
            sizes.add(img.size)
            means.append(tuple(int(v) for v in img.resize((1, 1)).getpixel((0, 0))))
    assert len(sizes) > 4 and len(set(means)) > 4                     # varied sizes and content
    report = json.loads((out / ".complete").read_text())
    assert report["dataset"] == "synthetic-jpeg" and report["images"] == 2 * (8 + 2)
    tool.main(["photos", "--out", str(out), "--preset", "dry"])        # a second call finds it
    assert "is there" in capsys.readouterr().out


def test_photos_real_only_fails_in_one_line_without_the_packages(tmp_path, capsys):
    tool = _tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["photos", "--out", str(tmp_path / "p"), "--preset", "dry", "--photo-root", str(tmp_path),
                   "--real-only"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tools/gpu_check.py photos: error: ") and "opencv-doc" in err
    assert "\n" not in err and not (tmp_path / "p").exists()


def test_photos_take_the_real_photos_where_the_packages_are(tmp_path, capsys):
    """The packages' folders under --photo-root: convert.py photos' own path, not the fallback."""
    from skimage import data
    mate = tmp_path / "root" / "usr" / "share" / "backgrounds" / "mate"
    mate.mkdir(parents=True)
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(mate / f"{name}.jpg", quality=95)
    tool = _tool()
    out = tmp_path / "photos"
    tool.main(["photos", "--out", str(out), "--preset", "dry", "--photo-root", str(tmp_path / "root"),
               "--workers", "1", "--real-only"])
    assert "real photos (convert.py photos)" in capsys.readouterr().out
    report = json.loads((out / ".complete").read_text())
    assert report["dataset"] == "photos" and report["images"] == 2 * (8 + 2)
    assert all(str(mate) in source for source in report["class_sources"].values())


def test_photos_refuse_a_folder_over_the_carry_limit(tmp_path, capsys):
    tool = _tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["photos", "--out", str(tmp_path / "p"), "--preset", "dry", "--photo-root", str(tmp_path),
                   "--max-mb", "0.001", "--workers", "1"])
    assert exit_info.value.code == 1 and "over the --max-mb 0.001 that can be carried" in capsys.readouterr().err


# ---- tools/gpu_check.py preflight -----------------------------------------------------------------

def test_preflight_names_what_does_not_import_and_the_script_reads_it(tmp_path, capsys, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "MODULES", ("shlex", "no_such_module_gpu_check", "torch"))
    assert tool.preflight(tmp_path) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("[gpu_check] preflight: imports shlex, torch " + __import__("torch").__version__
                     + "; does not import no_such_module_gpu_check (ModuleNotFoundError)")
    have = subprocess.run(["bash", "-c", f"source {tmp_path / 'have.sh'} && echo $HAVE_shlex $HAVE_torch "
                           "$HAVE_no_such_module_gpu_check \"$WHY_no_such_module_gpu_check\""],
                          capture_output=True, text=True, timeout=30).stdout
    assert have == "1 1 0 ModuleNotFoundError: No module named 'no_such_module_gpu_check'\n"
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] and env["imports"]["no_such_module_gpu_check"].startswith("ModuleNotFoundError")


# ---- the GPU run's commands, checked on the CPU without running them --------------------------------

def test_the_gpu_runs_commands_parse_and_their_configs_load(tmp_path):
    """The script in GPU mode with a python that only records its arguments: every bench.py command
    parses with bench.py's own parser, at the GPU sizes, and its configs, overrides and recipes load."""
    from masksiam.config import load_config
    from pipelines.augment.recipes import load_recipe
    keep = tmp_path / "keep"
    keep.mkdir()
    recorder = tmp_path / "python"
    recorder.write_text(f"""#!/bin/sh
for a in "$@"; do   # the configs the check writes in its temporary folder, kept for the checks below
  case "$a" in *.yaml*) echo "$a" | tr ',' '\\n' | while read -r f; do [ -f "$f" ] && cp "$f" {keep}/; done ;; esac
done
exec {sys.executable} -S -c 'import json, sys; print(json.dumps(sys.argv[2:]), file=open(sys.argv[1], "a"))' \\
  {keep}/argv.jsonl "$@"
""")
    recorder.chmod(0o755)
    data = tmp_path / "photos"
    (data / "train").mkdir(parents=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_PYTHON": str(recorder), "GPU_CHECK_DATA": str(data)}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    commands = [json.loads(line) for line in (keep / "argv.jsonl").read_text().splitlines()]
    assert commands[0][:2] == ["tools/gpu_check.py", "preflight"] and commands[-1][1] == "summary"
    runs = {}
    for argv in commands[1:-1]:
        if argv[:2] == ["-m", "pytest"]:
            runs["pytest"] = argv
            continue
        assert argv[0] == "bench.py", argv
        name = Path(argv[argv.index("--json") + 1]).stem
        runs[name] = argv
    assert list(runs) == ["augment-compiled-mscn", "train-simclr", "train-byol", "syncs-simclr-mscn",
                          "syncs-byol-mixmask", "pytest", "model-rest", "augment-eager", "augment-compiled-rest"]
    tests = runs.pop("pytest")
    assert tests[2:6] == ["-q", "-m", "gpu", "-p"] and len(tests[7:]) >= 5
    assert all("mark.gpu" in (ROOT / f).read_text() for f in tests[7:])

    parsed = {}
    for name, argv in runs.items():                 # bench.py's parser; the command is recorded, not run
        with pytest.MonkeyPatch.context() as mp:
            for mode in ("augment", "model", "train", "syncs"):
                mp.setattr(bench, f"cmd_{mode}", lambda args: args)
            parsed[name] = bench.main(argv[1:])
    for name in ("augment-compiled-mscn", "augment-eager", "augment-compiled-rest"):
        a = parsed[name]
        assert (a.device, a.batch_size, a.size, a.dtype, a.compile) == ("cuda", 256, 224, "bfloat16", "compiled" in name)
        for recipe in a.recipe.split(","):
            load_recipe(recipe)
    assert parsed["augment-compiled-mscn"].recipe == "mscn"
    assert parsed["augment-eager"].recipe.split(",") == ["mscn", "simclr", "byol", "mixmask", "simmim"]
    for name, methods, batch in (("train-simclr", ["simclr"], 256), ("train-byol", ["byol"], 256),
                                 ("syncs-simclr-mscn", ["simclr"], 64), ("syncs-byol-mixmask", ["byol"], 64),
                                 ("model-rest", ["simmim", "mixmae", "moco"], 128)):
        a = parsed[name]
        assert a.device == "cuda" and f"data={data}" in a.set
        configs = [keep / Path(c).name if not (ROOT / c).exists() else ROOT / c for c in a.config.split(",")]
        cfgs = [load_config(c, a.set) for c in configs]
        assert [c.method for c in cfgs] == methods
        for c in cfgs:
            assert (c.arch, c.size, c.precision, c.batch_size, c.channels_last) == ("resnet50", 224, "bf16", batch, True)
            bench.model_only_recipe(c.recipe, c.mix)            # the recipe (and its twin) load
        if name.startswith("train"):
            assert (a.warmup, a.batches) == (5, 20) and cfgs[0].workers == len(os.sched_getaffinity(0))
    assert parsed["train-simclr"].compare.split(",")[:2] == ["torchvision", "synthetic"]
    assert [load_config(ROOT / parsed[n].config, parsed[n].set).recipe for n in runs if n.startswith("syncs")] \
        == ["mscn", "mixmask"]
    assert [load_config(keep / f"{m}.yaml").recipe for m in ("simmim", "mixmae")] == ["simmim", "mixmae"]
