"""Multi-node rehearsal on one machine: two ``torchrun --nnodes 2`` agents (two "nodes") meet through a c10d
rendezvous on 127.0.0.1 and train over gloo, with the README's command shape.

Each node gets its own working directory, TMPDIR and gptforge cache, as two machines would have their own
disks, and writes its run directory relative to its working directory (SFT also with a shared ``--out-dir``).
What is checked:

- pretrain and SFT losses equal one process with the same global batch (2 accumulation steps);
- each process is local rank 0 of its node with its own global rank; only global rank 0 prints and writes
  (the other node's directories stay empty), and pretraining never reads back what rank 0 wrote;
- per-node work (a dataset download into the machine's cache, 2 nodes × 2 processes) happens once on every
  node, by its local rank 0, while the node's other rank waits and then reads the cached copy.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for both nodes together: a hung rendezvous fails the test instead of hanging CI

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, tiny_base: conftest.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_dirs(tmp_path: Path, node: int) -> dict[str, Path]:
    dirs = {k: tmp_path / f"node{node}" / k for k in ("work", "tmp", "cache")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def _run_two_nodes(tmp_path: Path, args: list[str], nproc_per_node: int = 1, env: dict | None = None
                   ) -> list[str]:
    """Start two torchrun agents at once (``--nnodes 2``, c10d rendezvous on a free loopback port), each with
    its own working directory, TMPDIR and GPTFORGE_CACHE_DIR; return each node's output (stdout + stderr)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    procs, files = [], []
    with contextlib.ExitStack() as stack:
        for node in (0, 1):
            dirs = _node_dirs(tmp_path, node)
            node_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
                        "TMPDIR": str(dirs["tmp"]), "GPTFORGE_CACHE_DIR": str(dirs["cache"]), **(env or {})}
            node_env = {k: v for k, v in node_env.items() if v is not None}
            out = stack.enter_context(open(logs / f"node{node}.txt", "w+"))  # not pipes: a full one stalls a rank
            files.append(out)
            procs.append(subprocess.Popen(
                [torchrun, "--nnodes", "2", "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"rehearsal-{port}", *args],
                cwd=dirs["work"], env=node_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        codes = None
        try:  # until both exit, one fails (its peer would wait for it in a collective), or the deadline
            while time.monotonic() < deadline:
                polled = [p.poll() for p in procs]
                if None not in polled or any(c not in (None, 0) for c in polled):
                    codes = polled
                    break
                time.sleep(0.2)
        finally:
            for p in procs:  # each agent leads its own process group (its workers included)
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        texts = []
        for out in files:
            out.seek(0)
            texts.append(out.read())
    if codes is None:
        pytest.fail(f"two-node run did not finish in {TIMEOUT} s (rendezvous or collective hung); output:\n"
                    + "\n".join(f"--- node {i}\n{t[-3000:]}" for i, t in enumerate(texts)))
    assert codes == [0, 0], "\n".join(f"--- node {i} (exit {c})\n{t[-3000:]}"
                                      for i, (c, t) in enumerate(zip(codes, texts)))
    return texts


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def _writer_node(tmp_path: Path, texts: list[str], marker: str, run_on_node_disk: bool = True) -> int:
    """The node that hosted global rank 0 (the c10d rendezvous assigns node ranks, not ``--node-rank``): it
    alone printed ``marker``; the other node's working directory and cache stay empty."""
    printed = [i for i, t in enumerate(texts) if marker in t]
    assert len(printed) == 1 and texts[printed[0]].count(marker) == 1, texts
    writer = printed[0]
    other = tmp_path / f"node{1 - writer}"
    assert _files(other / "work") == [] and _files(other / "cache") == []
    if run_on_node_disk:  # the run directory landed on rank 0's disk
        assert _files(tmp_path / f"node{writer}" / "work")
    return writer


@pytest.mark.slow
def test_two_node_pretrain_matches_one_process(shakespeare_shards, tmp_path, small_config, cli_args, losses):
    cfg = small_config(shakespeare_shards, tmp_path / "single-run", "single", steps=3)
    cfg.eval.interval = 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # one process: micro-batch 4 × 2 accumulation steps; two nodes × one process: micro-batch 4 each (global 8)
    single = subprocess.run([sys.executable, "-m", "gptforge", "pretrain", *cli_args(cfg)], env=env,
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    texts = _run_two_nodes(tmp_path, ["-m", "gptforge", "pretrain", *cli_args(cfg), "--out_dir=runs",
                                      "--name=multinode"])
    writer = _writer_node(tmp_path, texts, "accumulation 1")
    assert "device cpu × 2" in texts[writer]
    run = tmp_path / f"node{writer}" / "work" / "runs" / "multinode"
    a, b = losses(tmp_path / "single-run" / "single"), losses(run)
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, abs=1e-5)
    val = [[r["val_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if r.get("val_loss") is not None] for d in (tmp_path / "single-run" / "single", run)]
    assert len(val[0]) >= 1 and val[0] == pytest.approx(val[1], abs=1e-5)
    assert (run / "ckpt" / "step_0000003" / "model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("disks", [
    "shared",  # the run directory on a filesystem both nodes mount (an absolute --out-dir)
    "separate",  # each node writes to its own disk: only rank 0 reads the best checkpoint, the others get it by broadcast
])
def test_two_node_sft_matches_one_process(tiny_base, tmp_path, data_dir, disks):
    common = ["sft", "--checkpoint", str(tiny_base), "--data", str(data_dir / "instruct" / "instruction-data.json"),
              "--limit", "80", "--style", "alpaca", "--batch-size", "4", "--max-steps", "3", "--eval-every", "1",
              "--device", "cpu", "--no-test-responses", "--optim.lr=1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    single = subprocess.run([sys.executable, "-m", "gptforge", *common, "--out-dir", str(tmp_path / "single-run"),
                             "--name", "single", "--grad-accum", "2"],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    out_dir = str(tmp_path / "shared-runs") if disks == "shared" else "runs"  # relative: each node's own disk
    texts = _run_two_nodes(tmp_path, ["-m", "gptforge", *common, "--out-dir", out_dir, "--name", "multinode"])
    writer = _writer_node(tmp_path, texts, "SFT done", run_on_node_disk=disks == "separate")

    def metrics(run: Path) -> tuple[list[float], list[float]]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]

    runs = tmp_path / "shared-runs" if disks == "shared" else tmp_path / f"node{writer}" / "work" / "runs"
    run = runs / "multinode"
    train_a, val_a = metrics(tmp_path / "single-run" / "single")
    train_b, val_b = metrics(run)
    assert len(train_a) == len(train_b) == 3 and len(val_a) == len(val_b) == 4  # before training + 3 steps
    assert train_a == pytest.approx(train_b, abs=1e-5)
    assert val_a == pytest.approx(val_b, abs=1e-5)
    assert (run / "ckpt" / "best").read_text().strip() == "step_0000003"


FETCH_SCRIPT = '''
import json, os, sys, time
from pathlib import Path

from gptforge.data import registry
from gptforge.train import distributed as D

source = Path(sys.argv[1])  # the "remote" file, fetched through the registry's real download path (file://)
registry.DATASETS["rehearsal"] = registry.Dataset("rehearsal", "multi-node rehearsal", "rehearsal/data.txt", "txt",
                                                  url=source.as_uri(), sha256=sys.argv[2])
fetch = registry._download_url

def counted_fetch(url, dest):  # a slow download, logged beside this node's cache
    with open(Path(os.environ["GPTFORGE_CACHE_DIR"]).parent / "fetches.log", "a") as f:
        f.write(f"{os.environ['RANK']} {os.environ['LOCAL_RANK']}\\n")
    time.sleep(1.0)
    fetch(url, dest)

registry._download_url = counted_fetch
info = D.setup("cpu")
with D.per_node_first(info):
    found = registry.locate("rehearsal")
print("RESULT " + json.dumps({"rank": info.rank, "local_rank": info.local_rank, "origin": found.origin,
                              "path": str(found.path), "text": found.path.read_text()}), flush=True)
D.teardown()
'''


@pytest.mark.slow
def test_per_node_download_happens_once_on_every_node(tmp_path):
    from gptforge.io import sha256_file

    source = tmp_path / "remote" / "data.txt"
    source.parent.mkdir()
    source.write_text("to be, or not to be\n")
    script = tmp_path / "fetch.py"
    script.write_text(FETCH_SCRIPT)
    offline = {k: None for k in ("GPTFORGE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}  # file:// only
    texts = _run_two_nodes(tmp_path, [str(script), str(source), sha256_file(source)], nproc_per_node=2,
                           env=offline)
    results = [[json.loads(line.split("RESULT ", 1)[1]) for line in t.splitlines() if "RESULT " in line]
               for t in texts]
    assert sorted(r["rank"] for node in results for r in node) == [0, 1, 2, 3]  # global ranks
    for node, rows in enumerate(results):
        cache = tmp_path / f"node{node}" / "cache"
        assert sorted(r["local_rank"] for r in rows) == [0, 1]  # local ranks repeat on every node
        # the node's local rank 0 downloaded into this node's own cache, exactly once ...
        fetches = (tmp_path / f"node{node}" / "fetches.log").read_text().split("\n")[:-1]
        assert len(fetches) == 1 and fetches[0].split()[1] == "0"
        assert {r["rank"] for r in rows if r["local_rank"] == 0} == {int(fetches[0].split()[0])}
        assert _files(cache) == [cache / "rehearsal" / "data.txt"]
        # ... and the node's other rank waited, then read that copy
        origin = {r["local_rank"]: r["origin"] for r in rows}
        assert origin == {0: "download", 1: "cache"}
        assert {r["path"] for r in rows} == {str(cache / "rehearsal" / "data.txt")}
        assert {r["text"] for r in rows} == {source.read_text()}
