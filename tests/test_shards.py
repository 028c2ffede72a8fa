"""Sweeps beyond one machine: the completeness check (``lora-harness shards``), the recipes
in ci/ (valid files, calling options that exist) and, marked slow, a real sweep run as
separate shard processes started the way the SLURM and Kubernetes recipes start them,
checked and merged the way the recipes do."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.cli import main, parser
from harness.plan.options import build_config

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "ci"
CPU = {"has_gpu": False}
OPTS = {"device": "cpu", "precision": "bf16,fp32", "seq_len": "32,64"}  # 12 cells, 6 rows


def write_shard(folder, cfg, statuses=None, drop=()):
    """A shard's run folder as a sweep leaves it: run.json with the split, one record a cell."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": folder.name, "invocations": [],
                                                 "shard": cfg.shard.to_json()}))
    recs = [{"cell_id": c.cell_id, "status": (statuses or {}).get(c.cell_id, "ok")} for c in cfg.cells
            if c.cell_id not in drop]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


@pytest.fixture()
def sweep(tmp_path):
    """A complete sweep of 3 shards in tmp/sweep, and the three configs."""
    cfgs = [build_config(dict(OPTS, shard=f"{k}/3"), CPU) for k in (1, 2, 3)]
    for k, cfg in enumerate(cfgs, 1):
        write_shard(tmp_path / "sweep" / f"shard{k}", cfg)
    return tmp_path / "sweep", cfgs


def shards_cli(capsys, *args):
    rc = main(["shards", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_complete_set_of_shards_passes(sweep, capsys):
    root, cfgs = sweep
    rc, out, _ = shards_cli(capsys, root)
    assert rc == 0, out
    assert out.splitlines()[-1] == "COMPLETE: 3 of 3 shard(s) with cells, 12 of 12 cells recorded"
    assert f"sweep {cfgs[0].shard.split.fingerprint}: 3 shard(s), 12 cells" in out
    assert re.search(r"shard 2/3: complete, 4 of 4 cells \(4 ok\)  .*shard2", out)
    rc, out, _ = shards_cli(capsys, str(root / "shard*"))  # a quoted glob reads the same
    assert rc == 0


def test_a_missing_shard_names_its_cells(sweep, capsys):
    root, cfgs = sweep
    shutil.rmtree(root / "shard2")
    rc, out, _ = shards_cli(capsys, root / "shard1", root / "shard3")
    assert rc == 1
    assert "shard 2/3: MISSING (4 cells; no run folder)" in out
    for c in cfgs[1].cells:
        assert f"  {c.cell_id}  (shard 2/3)" in out
    assert out.splitlines()[-1] == "INCOMPLETE: 1 of 3 shard(s) missing; 4 of 12 cells not recorded"


def test_a_shard_cut_short_and_a_shard_run_twice(sweep, capsys):
    root, cfgs = sweep
    cut = cfgs[0].cells[-1].cell_id
    shutil.rmtree(root / "shard1")
    write_shard(root / "shard1", cfgs[0], drop=(cut,))  # e.g. --time-limit stopped it
    rc, out, _ = shards_cli(capsys, root)
    assert rc == 1 and "shard 1/3: incomplete, 3 of 4 cells (3 ok)" in out and f"  {cut}  (shard 1/3)" in out
    write_shard(root / "shard1-rerun", cfgs[0], statuses={cut: "oom"})
    rc, out, _ = shards_cli(capsys, root)
    assert rc == 0 and "duplicated cells (3;" in out  # the rerun recorded 3 cells shard1 has too
    assert "shard 1/3: complete, 4 of 4 cells (6 ok, 1 oom)" in out
    rc, out, _ = shards_cli(capsys, "--strict", root)
    assert rc == 1 and out.splitlines()[-1] == "INCOMPLETE: 3 cells recorded twice (--strict)"
    data = json.loads(shards_cli(capsys, "--json", root)[1])
    assert data["complete"] and len(data["duplicated"]) == 3 and data["shards"][0]["folders"][1].endswith("rerun")


def test_folders_of_another_split_or_no_split_are_named(sweep, capsys):
    root, _ = sweep
    write_shard(root.parent / "other" / "x", build_config(dict(OPTS, shard="1/2"), CPU))
    plain = root.parent / "other" / "plain"
    plain.mkdir()
    (plain / "results.jsonl").write_text(json.dumps({"cell_id": "a", "status": "ok"}) + "\n")
    rc, out, _ = shards_cli(capsys, root, root.parent / "other")
    assert rc == 1 and "another sweep" in out and out.endswith("folders of 2 different sweeps\n")
    assert f"note: {plain}: not a shard run (no shard in run.json); left out" in out


def test_an_empty_shard_is_not_missing(tmp_path, capsys):
    opts = {"device": "cpu", "precision": "bf16", "seq_len": "32", "grad_ckpt": "off,on"}  # 2 rows
    cfgs = [build_config(dict(opts, shard=f"{k}/3"), CPU) for k in (1, 2, 3)]
    assert [len(c.cells) for c in cfgs].count(0) == 1
    for k, cfg in enumerate(cfgs, 1):
        if cfg.cells:  # an empty shard runs nothing and writes no folder
            write_shard(tmp_path / f"s{k}", cfg)
    rc, out, _ = shards_cli(capsys, tmp_path)
    assert rc == 0 and "no cells by the split (nothing to run)" in out
    assert out.splitlines()[-1] == "COMPLETE: 2 of 2 shard(s) with cells, 2 of 2 cells recorded"


def test_unusable_input_is_one_line_and_exit_2(tmp_path, capsys):
    rc, out, err = shards_cli(capsys, tmp_path / "nope")
    assert rc == 2 and err.strip() == f"lora-harness: error: {tmp_path / 'nope'}: no such run folder"
    rc, _, err = shards_cli(capsys, str(tmp_path / "none-*"))
    assert rc == 2 and "matches no run folder" in err


def test_run_with_an_empty_shard_runs_nothing(tmp_path, capsys):
    rc = main(["run", "--device", "cpu", "--precision", "bf16", "--seq-len", "32", "--grad-ckpt", "off",
               "--shard", "2/2", "--run-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0 and "shard 2/2: no cells (the split of 1 cells gave this shard none); nothing to run" in out
    assert not (tmp_path / "r").exists()
    for bad, msg in (("5/4", "K must be between 1 and 4"), ("a/b", "expected K/N")):
        assert main(["cells", "--device", "cpu", "--shard", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err


def _pytest(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "suites/test_matrix.py", "-p", "no:cacheprovider",
                           "--device", "cpu", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_pytest_parametrises_this_shards_cells(tmp_path):
    p = _pytest("--collect-only", "-q", "--precision", "bf16,fp32", "--seq-len", "32,64", "--shard", "2/3")
    ids = re.findall(r"test_lora_cell\[(.+?)\]", p.stdout)
    assert ids == [c.cell_id for c in build_config(dict(OPTS, shard="2/3"), CPU).cells], p.stdout + p.stderr
    p = _pytest("--collect-only", "-q", "--shard", "0/3")
    assert p.returncode == 4 and "lora-harness: --shard 0/3: K must be between 1 and 3" in p.stderr
    # an empty shard: pytest's skip, a header line saying so, no run folder
    p = _pytest("--precision", "bf16", "--seq-len", "32", "--grad-ckpt", "off", "--shard", "2/2",
                "--run-dir", tmp_path / "r")
    assert p.returncode == 0 and "1 skipped" in p.stdout, p.stdout + p.stderr
    assert "lora-harness: shard 2/2: no cells" in p.stdout and not (tmp_path / "r").exists()


# -- the recipes ------------------------------------------------------------------------
SAMPLE = {"${{ matrix.shard }}": "2", "${{ strategy.job-total }}": "4", "$SHARDS": "4"}


def _scripts():
    """(recipe, shell script, its matrix options) triples: the sbatch file, the Job's
    container scripts, the workflow's run steps."""
    sbatch = (CI / "slurm-array.sbatch").read_text()
    out = [("slurm", sbatch, re.search(r'LORA_OPTS=\$\{LORA_OPTS:-"([^"]+)"\}', sbatch).group(1))]
    for doc in yaml.safe_load_all((CI / "k8s-indexed-job.yaml").read_text()):
        for c in (doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []):
            env = {e["name"]: e["value"] for e in c.get("env", [])}
            out.append(("k8s", c["args"][-1], env.get("LORA_OPTS", "")))
    wf = yaml.safe_load((CI / "github-gpu-shards.yml").read_text())
    for job in wf["jobs"].values():
        out += [("github", s["run"], wf["env"]["LORA_OPTS"]) for s in job["steps"] if "run" in s]
    return out


def _invocations(script, opts):
    """Every `lora-harness ...` command of a script, variables replaced by sample values."""
    text = script.replace("\\\n", " ")
    for k, v in SAMPLE.items():
        text = text.replace(k, v)
    text = text.replace("$LORA_OPTS", opts)
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}?", "x", text)  # other variables: any word
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [shlex.split(m.group(0), comments=True) for ln in lines for m in re.finditer(r"lora-harness [^|>;&]+", ln)]


def test_recipes_are_valid_files():
    for path in (CI / "k8s-indexed-job.yaml", CI / "github-gpu-shards.yml"):
        assert list(yaml.safe_load_all(path.read_text()))  # parses
    subprocess.run(["bash", "-n", str(CI / "slurm-array.sbatch")], check=True)
    for recipe, script, _ in _scripts():
        for k, v in SAMPLE.items():
            script = script.replace(k, v)
        p = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert p.returncode == 0, (recipe, p.stderr)
    sbatch = (CI / "slurm-array.sbatch").read_text()
    assert "#SBATCH --array=0-3" in sbatch and "#SBATCH --gres=gpu:1" in sbatch
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for d in yaml.safe_load_all((CI / "k8s-indexed-job.yaml").read_text())}
    job = docs["Job/lora-shards"]["spec"]
    pod = job["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert job["completionMode"] == "Indexed" and str(job["completions"]) == env["SHARDS"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim/lora-runs"]["metadata"]["name"]
    wf = yaml.safe_load((CI / "github-gpu-shards.yml").read_text())
    assert wf["jobs"]["shard"]["strategy"]["matrix"]["shard"] == [1, 2, 3, 4]
    assert wf["jobs"]["merge"]["needs"] == "shard"


def test_recipes_call_options_that_exist(monkeypatch):
    # the index variables the schedulers set, for --shard auto
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    seen = set()
    for recipe, script, opts in _scripts():
        for argv in _invocations(script, opts):
            ns = parser().parse_args(argv[1:])  # an unknown option is SystemExit: a failure here
            seen.add((recipe, ns.command))
            if ns.command in ("run", "cells"):
                cfg = build_config(vars(ns), CPU)
                assert cfg.shard is not None and cfg.shard.spec.count == 4, (recipe, argv)
    assert seen >= {("slurm", "run"), ("slurm", "shards"), ("slurm", "report"), ("k8s", "run"), ("k8s", "shards"),
                    ("k8s", "report"), ("github", "run"), ("github", "shards"), ("github", "report")}


# -- a real sweep in shard processes ------------------------------------------------------
def _env(tmp_path, **extra):
    """`lora-harness` on PATH as an installed harness would be, one thread a process
    (three shard processes share this host's cores)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "lora-harness"
    if not shim.exists():  # rewriting it while a started shard execs it fails with "Text file busy"
        tmp = bin_dir / ".lora-harness.tmp"
        tmp.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m harness "$@"\n')
        tmp.chmod(0o755)
        tmp.replace(shim)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", LORA_RUNS=str(tmp_path / "runs"), LORA_SWEEP="sweep-77",
               LORA_OPTS="--device cpu --precision bf16 --grad-ckpt off,on,offload --seq-len 32,64 --steps 1 "
                         "--warmup-steps 0 --cell-timeout 300", **extra)
    return env


@pytest.mark.slow
def test_shards_started_as_the_recipes_start_them_form_the_sweep(tmp_path):
    k8s_script = next(s for r, s, _ in _scripts() if r == "k8s" and "lora-harness run" in s)
    procs = [subprocess.Popen(["bash", str(CI / "slurm-array.sbatch")], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(tmp_path, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID=str(k),
                                       SLURM_ARRAY_TASK_COUNT="3"))
             for k in (0, 1)]
    procs.append(subprocess.Popen(["bash", "-c", k8s_script], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=_env(tmp_path, JOB_COMPLETION_INDEX="2", SHARDS="3")))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outs)
    sweep = tmp_path / "runs" / "sweep-77"
    metas = {d.name: json.loads((d / "run.json").read_text())["shard"] for d in sweep.iterdir()}
    assert {n: (m["label"], m["source"]) for n, m in metas.items()} == {
        "task0": ("1/3", "SLURM_ARRAY_TASK_ID=0"), "task1": ("2/3", "SLURM_ARRAY_TASK_ID=1"),
        "index2": ("3/3", "JOB_COMPLETION_INDEX=2")}
    assert len({m["fingerprint"] for m in metas.values()} | {m["split_digest"] for m in metas.values()}) == 2
    assert [len(s) for s in metas["task0"]["split"]] == [2, 2, 2]  # a row (two lengths) each

    merge = subprocess.run(["bash", str(CI / "slurm-array.sbatch"), "--merge"], cwd=tmp_path, text=True,
                           capture_output=True, env=_env(tmp_path), timeout=600)
    assert merge.returncode == 0, merge.stdout + merge.stderr
    assert "COMPLETE: 3 of 3 shard(s) with cells, 6 of 6 cells recorded" in merge.stdout
    report = (sweep / "report" / "report.md").read_text()
    assert "6 cells from 3 run folder(s)" in report
    assert all(cid in report for split in metas["task0"]["split"] for cid in split)

    # the workflow's merge job, on the folders as download-artifact lays them out
    gh = tmp_path / "gh"
    for name, meta in metas.items():
        shutil.copytree(sweep / name, gh / "shards" / f"lora-shard-{meta['index']}")
    step = next(s["run"] for s in yaml.safe_load((CI / "github-gpu-shards.yml").read_text())["jobs"]["merge"]["steps"]
                if "lora-harness shards" in s.get("run", ""))

    def gh_check():
        summary = gh / "summary.md"
        summary.write_text("")
        p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step], cwd=gh, text=True,
                           capture_output=True, env=_env(tmp_path, GITHUB_STEP_SUMMARY=str(summary)), timeout=300)
        return p.returncode, summary.read_text()

    rc, summary = gh_check()
    assert rc == 0 and "COMPLETE: 3 of 3" in summary and summary.startswith("```")
    shutil.rmtree(gh / "shards" / "lora-shard-2")  # a shard's artifact never arrived
    rc, summary = gh_check()
    assert rc == 1 and "shard 2/3: MISSING (2 cells; no run folder)" in summary
    assert all(f"  {cid}  (shard 2/3)" in summary for cid in metas["task1"]["split"][1])
    assert "INCOMPLETE: 1 of 3 shard(s) missing; 2 of 6 cells not recorded" in summary
