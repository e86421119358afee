"""Every entry point ends a user error the same way (masksiam/errors.py): one line on stderr,
`<prog>: error: <message naming the path / key / flag>`, no traceback, exit 2 for a wrong command line
or config and 1 for missing or bad data, checkpoints and folders.

Each case runs the entry point's `__main__` in its own process. Starting an interpreter and
importing torch costs seconds per process, so the cases share one: a runner imports the common
dependencies once, then forks a child per case that runs the script (runpy.run_path, as `python
train.py` does) or the module (runpy.run_module, as `python -m eval.knn` does) with its own argv,
stderr and exit status; an uncaught exception is printed and exits 1, as the interpreter does. Two
cases also run in a fresh interpreter, exactly as a user types them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# reads [[kind, target, argv], ...] (kind "script": a file of the repository, "module": a module
# name) as JSON on stdin; writes [{"code", "stderr"}, ...] as JSON on stdout
RUNNER = r"""
import json, os, runpy, sys, traceback
cases = json.load(sys.stdin)
import torch, torchvision, masksiam, masksiam.config, eval.common, pipelines.loaders  # once, before forking
results = []
for kind, target, argv in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = 0
        try:
            if kind == "script":
                sys.argv = [target, *argv]
                runpy.run_path(target, run_name="__main__")
            else:
                sys.argv = [target, *argv]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
            code = code or 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r, errors="replace") as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    results.append({"code": os.waitstatus_to_exitcode(status), "stderr": err})
print(json.dumps(results))
"""

TINY = ["arch=resnet10", "width=8", "size=24", "stem=small", "batch_size=8", "workers=0", "epochs=1",
        "final_eval=false", "online_probe=false", "progress=false"]


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def inputs(image_folder, tmp_path_factory) -> dict[str, Path]:
    """Bad inputs a user meets: a truncated checkpoint, a Siamese run's checkpoint where a MIM one is
    needed, a regular file where a folder must be created, a non-empty output folder, results."""
    from masksiam.config import Config, to_dict
    from models.resnet import build_backbone_from_config
    tmp = tmp_path_factory.mktemp("entry")
    good = tmp / "simclr" / "checkpoint.pt"
    good.parent.mkdir()
    cfg = Config(method="simclr", arch="resnet10", width=8, size=24, stem="small", data=str(image_folder))
    torch.save({"config": to_dict(cfg), "model": {}, "backbone": build_backbone_from_config(cfg).state_dict()},
               good)
    truncated = tmp / "truncated" / "checkpoint.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:200])
    (tmp / "a_file").write_text("not a folder\n")
    full = tmp / "full"
    full.mkdir()
    (full / "something").write_text("x")
    results = tmp / "results"
    results.mkdir()
    (results / "knn.json").write_text(json.dumps({"eval": "knn", "metrics": {"top1": 0.5}, "curves": {}}))
    return {"tmp": tmp, "data": image_folder, "siamese": good, "truncated": truncated, "file": tmp / "a_file",
            "full": full, "results": results, "nowhere": tmp / "nowhere"}


# (id, kind, target, argv, exit code, fragments of the one line); {name} is an `inputs` path
CASES = [
    # train.py: a wrong key or flag, a missing config, an out_dir under a regular file
    ("train-unknown-key", "script", "train.py", ["epoch=3"], 2, ["unknown config key 'epoch'", "epochs"]),
    ("train-bad-flag", "script", "train.py", ["--confg", "x.yaml"], 2, ["--confg"]),
    ("train-missing-config", "script", "train.py", ["--config", "{nowhere}/run.yaml"], 2, ["{nowhere}/run.yaml"]),
    ("train-bad-value", "script", "train.py", ["lr=fast"], 2, ["'lr'", "fast"]),
    ("train-uncreatable-out-dir", "script", "train.py", ["data={data}", "out_dir={file}/runs", *TINY], 1,
     ["{file}/runs", "Not a directory"]),
    # convert.py and its commands
    ("convert-unknown-command", "script", "convert.py", ["imagenet"], 2, ["imagenet"]),
    ("convert-validate-missing", "script", "convert.py", ["validate", "{nowhere}"], 1, ["{nowhere} does not exist"]),
    ("convert-webdataset-missing", "script", "convert.py", ["webdataset", "--src", "{nowhere}", "--out", "{tmp}/wds"],
     1, ["{nowhere} does not exist"]),
    ("convert-webdataset-nonempty", "script", "convert.py", ["webdataset", "--src", "{data}", "--out", "{full}"], 1,
     ["{full}", "--force"]),
    ("convert-webdataset-bad-shard-size", "script", "convert.py", ["webdataset", "--src", "{data}", "--out",
                                                                   "{tmp}/wds", "--shard-size", "0"], 2,
     ["--shard-size", "positive"]),
    ("convert-ffcv-missing", "script", "convert.py", ["ffcv", "--src", "{nowhere}", "--out", "{tmp}/x.beton"], 1,
     ["{nowhere} does not exist"]),
    ("convert-photos-bad-flag", "script", "convert.py", ["photos", "--out", "{tmp}/p", "--classes", "many"], 2,
     ["--classes", "many"]),
    # evaluation
    ("knn-truncated", "module", "eval.knn", ["--checkpoint", "{truncated}"], 1, ["{truncated}", "cannot be read"]),
    ("knn-missing", "module", "eval.knn", ["--checkpoint", "{nowhere}/checkpoint.pt"], 1,
     ["{nowhere}/checkpoint.pt does not exist"]),
    ("knn-bad-flag", "module", "eval.knn", ["--checkpoint", "{siamese}", "--k", "many"], 2, ["--k", "many"]),
    ("knn-missing-data", "module", "eval.knn", ["--checkpoint", "{siamese}", "--data", "{nowhere}"], 1,
     ["{nowhere}"]),
    ("knn-unknown-key", "module", "eval.knn", ["--checkpoint", "{siamese}", "knn_kk=3"], 2,
     ["unknown config key 'knn_kk' in command line", "'knn_k'"]),
    ("knn-bad-value", "module", "eval.knn", ["--checkpoint", "{siamese}", "knn_k=many"], 2, ["'knn_k'", "many"]),
    ("finetune-unknown-key", "module", "eval.finetune", ["--checkpoint", "{siamese}", "val_spilt=test"], 2,
     ["unknown config key 'val_spilt' in command line", "'val_split'"]),
    ("linear-truncated", "module", "eval.linear", ["--checkpoint", "{truncated}"], 1, ["{truncated}"]),
    ("linear-unknown-preset", "module", "eval.linear", ["--checkpoint", "{siamese}", "--preset", "best"], 2,
     ["--preset", "best"]),
    ("finetune-truncated", "module", "eval.finetune", ["--checkpoint", "{truncated}"], 1, ["{truncated}"]),
    ("finetune-conflicting-flags", "module", "eval.finetune", ["--checkpoint", "{siamese}", "--scratch", "--full"],
     2, ["--scratch", "--full"]),
    ("export-truncated", "module", "eval.export", ["--checkpoint", "{truncated}", "--out", "{tmp}/r.pt"], 1,
     ["{truncated}"]),
    ("export-missing-out", "module", "eval.export", ["--checkpoint", "{siamese}"], 2, ["--out"]),
    ("report-missing-run", "module", "eval.report", ["{nowhere}"], 1, ["{nowhere} does not exist"]),
    ("report-no-results", "module", "eval.report", ["{full}"], 1, ["no results in {full}"]),
    ("report-uncreatable-out", "module", "eval.report", ["{results}", "--out", "{file}/report"], 1,
     ["{file}/report", "Not a directory"]),
    ("demo-report-missing-run", "module", "eval.demo_report", ["--run", "{nowhere}"], 1,
     ["{nowhere}/result.json is missing"]),
    # bench.py and its modes
    ("bench-unknown-mode", "script", "bench.py", ["speed"], 2, ["speed"]),
    ("bench-loader-missing-data", "script", "bench.py", ["loader", "--data", "{nowhere}", "--device", "cpu",
                                                          "--json", "{tmp}/b/loader.json"], 1, ["{nowhere}"]),
    ("bench-loader-bad-sweep", "script", "bench.py", ["loader", "--data", "{data}", "--sweep", "threads=1,2"], 2,
     ["--sweep threads", "choose from"]),
    ("bench-model-unknown-key", "script", "bench.py", ["model", "--set", "epoch=1", "--device", "cpu"], 2,
     ["'epoch'"]),
    ("bench-train-unknown-key-after-flags", "script", "bench.py", ["train", "--device", "cpu", "epoch=1"], 2,
     ["'epoch'"]),
    ("bench-explain-bad-delay", "script", "bench.py", ["explain", "--delay", "decode=1"], 2, ["--delay 'decode=1'"]),
    ("bench-readme-no-results", "script", "bench.py", ["readme", "--results", "{nowhere}"], 1, ["{nowhere}"]),
    # python -m pipelines.show
    ("show-truncated-checkpoint", "module", "pipelines.show", ["--checkpoint", "{truncated}", "--out",
                                                               "{tmp}/r.png"], 1, ["{truncated}", "cannot be read"]),
    ("show-siamese-checkpoint", "module", "pipelines.show", ["--checkpoint", "{siamese}", "--out", "{tmp}/r.png"], 2,
     ["{siamese}", "'simclr' run", "simmim"]),
    ("show-missing-data", "module", "pipelines.show", ["--data", "{nowhere}", "--out", "{tmp}/v.png"], 1,
     ["{nowhere}"]),
    ("show-no-data", "module", "pipelines.show", ["--out", "{tmp}/v.png"], 2, ["--data"]),
    ("show-uncreatable-out", "module", "pipelines.show", ["--data", "{data}", "--size", "32", "--images", "2",
                                                          "--out", "{file}/views/v.png"], 1,
     ["{file}/views", "Not a directory"]),
]


def _fill(text: str, inputs: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in inputs.items()})


@pytest.fixture(scope="module")
def outcomes(inputs) -> dict[str, dict]:
    """Every case's exit code and stderr, from one runner process."""
    cases = [[kind, str(REPO / target) if kind == "script" else target, [_fill(a, inputs) for a in argv]]
             for _, kind, target, argv, _, _ in CASES]
    r = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(cases), capture_output=True, text=True,
                       cwd=inputs["tmp"], env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {case[0]: out for case, out in zip(CASES, json.loads(r.stdout.strip().splitlines()[-1]))}


def _check(prog: str, code: int, stderr: str, expected_code: int, fragments: list[str]) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert code == expected_code, (code, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line(case, outcomes, inputs):
    name, kind, target, _, code, fragments = case
    out = outcomes[name]
    _check(target, out["code"], out["stderr"], code, [_fill(f, inputs) for f in fragments])


@pytest.mark.parametrize("argv, code, fragments", [
    (["train.py", "epoch=3"], 2, ["'epoch'"]),
    (["convert.py", "validate", "{nowhere}"], 1, ["{nowhere} does not exist"]),
], ids=["train-unknown-key", "convert-validate-missing"])
def test_fresh_interpreter(argv, code, fragments, inputs):
    """The same, exactly as typed: `python train.py epoch=3` in a new interpreter."""
    r = subprocess.run([sys.executable, str(REPO / argv[0]), *[_fill(a, inputs) for a in argv[1:]]],
                       capture_output=True, text=True, cwd=inputs["tmp"], env=_env(), timeout=300)
    _check(argv[0], r.returncode, r.stderr, code, [_fill(f, inputs) for f in fragments])


def test_in_process_callers_see_the_line(inputs, capsys):
    """main(argv) called from Python (bench.py runs train.main, demo_report runs eval.knn's) ends the
    same way: the line on stderr and a SystemExit carrying the code, whose text is the line."""
    from eval import knn
    with pytest.raises(SystemExit) as err:
        knn.main(["--checkpoint", str(inputs["truncated"])])
    assert err.value.code == 1 and str(err.value).startswith("eval.knn: error: ")
    assert capsys.readouterr().err.strip() == str(err.value)


def test_os_errors_without_a_file_keep_their_traceback():
    """Only file-system errors on a named path are the user's; anything else is a bug."""
    from masksiam.errors import exit_on_user_error

    def broken():
        raise OSError("no file named")
    with pytest.raises(OSError, match="no file named"):
        exit_on_user_error("prog", broken)


def test_eval_takes_config_overrides_as_train_does(inputs, tmp_path):
    """key=value after the flags: the run's config keys, parsed by train.py's parser (yaml values)."""
    from eval import knn
    res = knn.main(["--checkpoint", str(inputs["siamese"]), "--out", str(tmp_path), "--no-progress",
                    "knn_k=3", "knn_t=0.5", "eval_size=16", "workers=0"])
    assert (res["k"], res["t"]) == (3, 0.5) and 0 <= res["knn_top1"] <= 1
    assert json.loads((tmp_path / "knn.json").read_text())["settings"]["k"] == 3
