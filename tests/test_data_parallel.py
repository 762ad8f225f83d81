"""Data-parallel runs (torchrun, gloo, one thread per rank): the output bytes do not depend on the number of
processes; a killed job resumes with another number of ranks; a dead or hung rank stops the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowmem_gblm.calib.images import save_pixels
from lowmem_gblm.errors import UsageError
from lowmem_gblm.ranks import Ranks
from lowmem_gblm.stream.partition import Partition, auto_chunk
from lowmem_gblm.stream.reduce import ChunkFold
from tests.faults import REPO
from tests.tiny import VISION_SIZE, make_tiny_vision

LAUNCH_TIMEOUT = 240  # seconds for one launched job (they take ~10 s)


# ---------------------------------------------------------------------------------------------
# the partition and the fold, in one process


@pytest.mark.parametrize("n,chunk", [(1, 1), (6, 1), (7, 2), (10, 3), (16, 16)])
def test_partition_deals_whole_chunks_and_covers_every_window_once(n, chunk):
    chunks = Partition(n, chunk).chunks
    for world in range(1, len(chunks) + 1):
        parts = [Partition(n, chunk, world, r) for r in range(world)]
        assert all(p.chunks == chunks for p in parts)  # the chunks never depend on the ranks
        held = sorted(w for p in parts for w in p.local_windows)
        assert held == list(range(n))
        for w in range(n):
            owner, local = parts[0].locate(w)
            assert parts[owner].local_windows[local] == w
        for p in parts:
            for step in range(p.steps):
                j = p.at_step(step)
                for start, count in p.batches(step, 2):  # a call never crosses a chunk
                    first = p.local_windows[start]
                    assert chunks[j][0] <= first and first + count <= sum(chunks[j])


def test_auto_chunk_cuts_at_most_eight_chunks():
    assert [auto_chunk(n) for n in (1, 6, 8, 9, 128)] == [1, 1, 1, 2, 16]
    assert len(Partition(128, auto_chunk(128)).chunks) == 8


def test_chunk_fold_adds_chunk_sums_in_chunk_order():
    part = Partition(5, 2)  # chunks [0,1] [2,3] [4]
    fold = ChunkFold(Ranks(), part, "test")
    acc = {"x": torch.zeros(2)}
    values = [torch.tensor([1e8, 1.0]), torch.tensor([1.0, 2.0]), torch.tensor([-1e8, 3.0]),
              torch.tensor([1.0, 4.0]), torch.tensor([0.5, 5.0])]
    windows = iter(values)
    for step in range(part.steps):
        for _ in part.batches(step, 1):
            acc["x"] += next(windows)
        fold.step(step, acc)
        assert not acc["x"].any()  # zeroed for the next chunk
    c = [values[0] + values[1], values[2] + values[3], values[4]]
    expected = (c[0].clone() + c[1]) + c[2]
    got = fold.result("x")
    assert torch.equal(got, expected)
    # fp32: chunk sums (1e8 + 1) = 1e8 and (-1e8 + 1) = -1e8, so 0 + 0.5; window by window it would be 1.5
    assert got.tolist() == [0.5, 15.0]


# ---------------------------------------------------------------------------------------------
# launched jobs


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOWMEM_TEST_", "RANK", "WORLD_SIZE"))}
    return env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LOWMEM_GBLM_RANK_TIMEOUT": "60"} | extra


def _launch(nproc: int, args: list[str], timeout: float = LAUNCH_TIMEOUT, **env) -> subprocess.CompletedProcess:
    """``args`` (a script path or ``-m module ...``) under torchrun with ``nproc`` processes; 1: no launcher."""
    cmd = [sys.executable, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _cli(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return ["-m", "lowmem_gblm", "prune", str(model), str(out), "--method", "gblm", "--calib", str(calib),
            "--nsamples", "6", "--seqlen", "32", "--device", "cpu", "--offload", "disk", "--batch-size", "2",
            "--chunk-windows", "1", "--quiet", *extra]


def _bytes(folder: Path) -> dict[str, bytes]:
    """Every output tensor file under ``folder`` (shards, gradient files, calibration ids) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))
            if "incoming" not in p.name}


def _jobs(model: Path, calib: Path, root: Path, vision: tuple[Path, Path] | None = None) -> list[dict]:
    common = {"model_dir": str(model), "device": "cpu", "offload": "cpu", "progress": False}
    cal = {"source": str(calib), "nsamples": 6, "seqlen": 32}
    jobs = []
    # each method's reduction once; the pattern only picks the mask from the reduced statistics, so one
    # pattern per method (both patterns for the methods whose mask depends on the weight update)
    for method, extra, patterns in [("magnitude", {}, ("unstructured",)), ("wanda", {}, ("unstructured",)),
                                    ("gblm", {"grad_norm": "l1"}, ("unstructured",)),
                                    ("gblm", {"grad_norm": "l2"}, ("2:4",)),
                                    ("sparsegpt", {}, ("unstructured", "2:4"))]:
        for pattern in patterns:
            name = f"{method}{extra.get('grad_norm', '')}-{pattern.replace(':', '_')}"
            jobs.append(common | extra | {"kind": "prune", "out": str(root / name), "calib": cal, "method": method,
                                          "pattern": pattern, "sparsity": 0.5 if pattern == "unstructured" else None})
    jobs.append(common | {"kind": "prune", "out": str(root / "wanda-lsq-2_4"), "calib": cal, "method": "wanda",
                          "pattern": "2:4", "sparsity": None, "update": "lsq"})
    jobs.append(common | {"kind": "prune", "out": str(root / "wanda-owl"), "calib": cal, "method": "wanda",
                          "sparsity": 0.6, "layer_sparsity": "owl", "owl_m": 3.0})
    # batches inside chunks of 2 windows, a disk store, segment checkpoints
    jobs.append(common | {"kind": "prune", "out": str(root / "gblm-b2c2-disk"), "method": "gblm",
                          "calib": cal | {"nsamples": 7}, "batch_size": 2, "chunk_windows": 2, "offload": "disk",
                          "checkpoint_every": 2, "grad_norm": "l2"})
    jobs.append(common | {"kind": "gradients", "out": str(root / "grads"), "calib": cal, "batch_size": 2})
    if vision is not None:  # a vision transformer: images dealt to the ranks like windows
        vmodel, pixels = vision
        vcal = {"pixels_file": str(pixels), "nsamples": 6}
        for method, pattern in (("gblm", "unstructured"), ("sparsegpt", "2:4")):
            jobs.append(common | {"kind": "prune", "model_dir": str(vmodel), "out": str(root / f"vit-{method}"),
                                  "calib": vcal, "method": method, "pattern": pattern, "batch_size": 2,
                                  "sparsity": 0.5 if pattern == "unstructured" else None})
    for name, src in (("eval-dense", model), ("eval-wanda", root / "wanda-unstructured")):
        jobs.append({"kind": "eval", "out": str(root / f"{name}.json"), "model_dir": str(src), "data": str(calib),
                     "seqlen": 32, "max_windows": 9, "device": "cpu", "progress": False, "batch_size": 2})
    return jobs


def test_one_two_and_three_processes_write_the_same_bytes(tiny_model, calib_text, tmp_path):
    results = {}
    pixels = tmp_path / "pixels.safetensors"
    save_pixels(pixels, torch.randn(6, 3, VISION_SIZE, VISION_SIZE, generator=torch.Generator().manual_seed(1)),
                torch.tensor([0, 1, 2, 0, 1, 2]))
    vision = (make_tiny_vision(tmp_path / "vit", "vit", layers=2), pixels)
    for nproc in (1, 2, 3):
        root = tmp_path / f"r{nproc}"
        root.mkdir()
        spec = root / "jobs.json"
        spec.write_text(json.dumps(_jobs(tiny_model, calib_text, root, vision)))
        done = _launch(nproc, [str(REPO / "tests" / "dp_jobs.py"), str(spec)])
        assert done.returncode == 0, done.stderr[-3000:]
        outputs = {}
        for job in json.loads(spec.read_text()):
            out = Path(job["out"])
            outputs[out.name] = json.loads(out.read_text()) if job["kind"] == "eval" else _bytes(out)
            if job["kind"] != "eval":
                assert outputs[out.name], f"{out} holds no tensor file"
        if nproc > 1:
            report = json.loads((root / "wanda-unstructured" / "prune_report.json").read_text())
            assert report["ranks"]["world_size"] == nproc
            assert sum(r["windows"] for r in report["ranks"]["per_rank"]) == 6
        results[nproc] = outputs
    for nproc in (2, 3):
        for name, value in results[1].items():
            assert results[nproc][name] == value, f"{name}: {nproc} processes differ from one"
    assert results[1]["eval-wanda.json"]["ppl"] > results[1]["eval-dense.json"]["ppl"] > 1


def test_no_rank_writes_outside_the_writers_out_dir(tiny_model, calib_text, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    done = _launch(2, _cli(tiny_model, out, calib_text), LOWMEM_GBLM_SCRATCH=str(scratch))
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(scratch.iterdir()) == []  # rank 1's disk store lived there and is gone
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("model-"))
    assert shards[-1] == "model-00004-of-00004.safetensors"
    assert not (out / ".lowmem" / "gradients").exists()


@pytest.fixture(scope="module")
def reference(tiny_model, calib_text, tmp_path_factory) -> dict[str, bytes]:
    """The tensor files of ``_cli``'s run in one process, without a launcher (read-only for the tests)."""
    ref = tmp_path_factory.mktemp("dp-ref") / "out"
    assert _launch(1, _cli(tiny_model, ref, calib_text)).returncode == 0
    return _bytes(ref)


@pytest.mark.parametrize("kill_at,resume_with", [("gradient_block:2", 3), ("block_done:2", 1)])
def test_a_killed_job_resumes_with_another_number_of_ranks(tiny_model, calib_text, tmp_path, kill_at, resume_with,
                                                           reference):
    out = tmp_path / "out"
    killed = _launch(2, _cli(tiny_model, out, calib_text), LOWMEM_TEST_CRASH_AT=kill_at, LOWMEM_TEST_RANK="0")
    assert killed.returncode != 0
    assert not (out / "model.safetensors.index.json").exists()
    done = _launch(resume_with, _cli(tiny_model, out, calib_text))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _bytes(out) == reference


def test_a_rank_killed_alone_stops_the_job_and_the_rerun_completes(tiny_model, calib_text, tmp_path, reference):
    out = tmp_path / "out"
    t0 = time.monotonic()
    killed = _launch(2, _cli(tiny_model, out, calib_text), LOWMEM_TEST_CRASH_AT="fold:5", LOWMEM_TEST_RANK="1")
    assert killed.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "rank      : 1" in killed.stderr  # the launcher names the rank that died first
    done = _launch(2, _cli(tiny_model, out, calib_text))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _bytes(out) == reference


def test_a_hung_rank_makes_the_others_fail_within_the_timeout_naming_it(tiny_model, calib_text, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    hung = _launch(2, _cli(tiny_model, out, calib_text), LOWMEM_TEST_HANG_AT="fold:5", LOWMEM_TEST_RANK="1",
                   LOWMEM_GBLM_RANK_TIMEOUT="5")
    assert hung.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "rank(s) 1 did not answer" in hung.stderr
    assert "error (rank 0)" in hung.stderr


# ---------------------------------------------------------------------------------------------
# the planner, per rank


def test_the_plan_is_per_rank(tiny_model):
    from lowmem_gblm.memory.plan import Budgets, PlanSettings, plan
    from lowmem_gblm.memory.shape import load_shape

    shape = load_shape(tiny_model)
    budgets = Budgets(cpu_memory=None, disk_free=10**12, disk_dir=tiny_model)

    def predicted(nproc: int, rank: int = 0, nsamples: int = 12) -> dict:
        s = PlanSettings(method="gblm", nsamples=nsamples, seqlen=64, offload="disk", nproc=nproc, rank=rank,
                         chunk_windows=1)
        p = plan(shape, s, budgets, baseline=0)
        return {q.name: q.terms for q in p.phases} | {"settings": p.settings.as_dict()}

    one, four, other = predicted(1), predicted(4), predicted(4, rank=3)
    boundary = 64 * shape.hidden * 4  # one window's [T, D] fp32 on disk
    assert one["prune_sweep"]["disk"]["two boundaries [N,T,D]"] == 2 * 12 * boundary
    assert four["prune_sweep"]["disk"]["two boundaries [N,T,D]"] == 2 * 3 * boundary  # 3 of 12 windows
    assert four["settings"]["windows_on_rank"] == 3
    # only the writer writes OUT_DIR (shards, gradient files, the persisted incoming gradient of all 12 windows)
    assert "output checkpoint" not in other["prune_sweep"]["disk"]
    assert other["gradient_sweep"]["disk"].keys() == {k for k in four["gradient_sweep"]["disk"]
                                                       if k.startswith(("boundaries", "two gradient"))}
    assert four["gradient_sweep"]["disk"]["persisted incoming gradient (old + new while replaced)"] == 2 * 12 * boundary
    # the writer folds chunk sums into totals the size of the block's linears (fp32); the others do not
    totals = "accumulators' chunk-sum totals (writer)"

    def device_terms(rank: int, nsamples: int = 12) -> dict:
        s = PlanSettings(method="gblm", nsamples=nsamples, seqlen=64, device="cuda", offload="disk", nproc=2,
                         rank=rank, chunk_windows=1)
        return plan(shape, s, budgets, baseline=0).phase("gradient_sweep").terms["device"]

    assert device_terms(0)[totals] == shape.linear_numel * 4
    assert totals not in device_terms(1)
    assert not PlanSettings(method="gblm", nsamples=1, seqlen=64).folds  # one chunk: nothing to fold
    with pytest.raises(UsageError, match="3 ranks but only 2 chunk"):
        plan(shape, PlanSettings(method="wanda", nsamples=4, seqlen=64, nproc=3, chunk_windows=2), budgets, baseline=0)


def test_accelerate_launch_runs_the_same_job(tiny_model, calib_text, tmp_path, reference):
    """``accelerate launch --multi_gpu`` (torch's elastic launcher underneath; on CPU too) gives the same bytes."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *_cli(tiny_model, out, calib_text)]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "prune_report.json").read_text())["ranks"]["world_size"] == 2
    assert _bytes(out) == reference
