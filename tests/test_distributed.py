"""Data parallel on torch's engines: 2 CPU processes (gloo, torchrun) under DistributedDataParallel and under FSDP2
give the losses and weights of 1 process, and a 2-process checkpoint resumes in 1 process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# 1 warm-up + 2 REFINE steps; 2 micro-batches per process, so gradients also accumulate without sync
ARGS = ["--device=cpu", "--seq_len=32", "--batch_size=4", "--micro_batch_size=1", "--n_chunks=2",
        "--rollout_len=3", "--margin=2", "--warmup_steps=1", "--warmup_seq_len=32", "--warmup_batch_size=4",
        "--eval_examples=2", "--eval_lengths=64", "--eval_batches=1", "--lr_warmup=0", "--n_needles=1",
        "--lr_schedule=constant"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(out_dir, *extra, processes=1, preset="toy"):
    cmd = [str(ROOT / "train.py"), f"--preset={preset}", *ARGS, f"--out_dir={out_dir}", *extra]
    if processes > 1:
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}", *cmd]
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def rows(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl") if '"step"' in line]


def weights(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=False)["model"]


def assert_same_run(a, b):
    """Same phases, losses and final weights up to the order of floating-point sums across processes."""
    ra, rb = rows(a), rows(b)
    assert [r["phase"] for r in ra] == [r["phase"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["ntp_loss"] == pytest.approx(y["ntp_loss"], rel=1e-5)
        assert x["nsp_loss"] == pytest.approx(y["nsp_loss"], rel=1e-3, abs=1e-6)
        assert (x["reward_mean"] is None) == (y["reward_mean"] is None)
        if x["reward_mean"] is not None:  # the rewards of all processes
            assert x["reward_mean"] == pytest.approx(y["reward_mean"], rel=1e-4)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The 1-process run of a preset (made once)."""
    runs = {}

    def run(preset):
        if preset not in runs:
            runs[preset] = tmp_path_factory.mktemp(preset)
            train(runs[preset], "--max_steps=2", preset=preset)
        return runs[preset]
    return run


@pytest.mark.parametrize("preset,mode", [("toy", "ddp"), ("toy", "fsdp"), ("toy-lact", "fsdp")])
def test_two_processes_equal_one(preset, mode, one, tmp_path):
    out = train(tmp_path, "--max_steps=2", f"--parallel={mode}", processes=2, preset=preset)
    assert f"processes: 2 ({mode})" in out
    assert [r["phase"] for r in rows(tmp_path)] == ["warmup", "refine", "refine"]
    assert_same_run(one(preset), tmp_path)
    assert (tmp_path / "hf" / "model.safetensors").exists() and "validation: loss" in out


def test_fsdp_checkpoint_resumes_in_one_process(tmp_path):
    """2 FSDP2 processes write one full checkpoint after 3 steps; 1 process resumes it for a 4th step and matches
    4 straight steps in 1 process."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, "--max_steps=3")
    train(resumed, "--max_steps=2", "--parallel=fsdp", processes=2)
    assert torch.load(resumed / "ckpt.pt", weights_only=False)["step"] == 3
    train(resumed, "--max_steps=3", "--resume")
    assert_same_run(straight, resumed)
