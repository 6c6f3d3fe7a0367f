"""Real training through the cluster launchers, on this machine: two machines (two `accelerate launch` agents,
one CPU process each over gloo) started by launch/slurm/multi_node.sbatch on 127.0.0.1, and on two network
namespaces joined by a veth pair; and launch/local.sh on the CPU. Only srun, scontrol and sbatch are doubles."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import REPO, tiny_flags
from tests.slurm_doubles import (
    JOB_ID,
    calls,
    finish,
    install_doubles,
    job_dir,
    job_env,
    run,
    signal_job_step,
    signal_tree,
    start,
    task_exits,
)
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.reading import Checkpoint, newest_complete, verify
from vaegan_dist.checkpoint.tensors import AVERAGE_FILES, weights_digest
from vaegan_dist.config import TrainConfig
from vaegan_dist.exits import Ending
from vaegan_dist.model.networks import PerNetwork, build_models, moving_averages

TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_cpu_machines(tmp_path, hostnames: list[str], **settings: str) -> dict[str, str]:
    """The environment of a two-node CPU job whose nodes are named `hostnames` (the head first)."""
    doubles = install_doubles(tmp_path)
    return job_env(tmp_path, doubles, nodes=2, hostnames=hostnames, PROCESSES_PER_NODE="1",
                   ACCELERATE_USE_CPU="1", MIXED_PRECISION="no", HEAD_PORT=str(free_port()), **settings)


def run_job(env: dict[str, str], *flags: str) -> str:
    """Runs multi_node.sbatch as SLURM would; asserts that it and every node's task exit 0."""
    code, output = run(["bash", "launch/slurm/multi_node.sbatch", *flags], env, timeout=TIMEOUT)
    assert code == 0, output[-6000:]
    assert all(codes[-1] == 0 for codes in task_exits(env, nodes=2)), output[-6000:]
    return output


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def final_checkpoint(output_dir) -> Checkpoint:
    """The newest complete checkpoint, verified against its COMPLETE file."""
    path = newest_complete(checkpoints_dir(output_dir), report=pytest.fail)
    assert path is not None and verify(path) is None
    return Checkpoint(path)


def assert_replicas_hold_the_saved_weights(checkpoint: Checkpoint) -> None:
    """Every process's weight digest (recorded at the save) is the digest of the weights in the files."""
    config = TrainConfig.from_dict(checkpoint.config)
    trained = build_models(config)
    networks = dict(zip(PerNetwork._fields, trained, strict=True))
    if checkpoint.has_network(AVERAGE_FILES["decoder"]):  # the moving averages are part of the digest too
        averages = moving_averages(config, trained)._asdict()
        networks |= {file: averages[name] for name, file in AVERAGE_FILES.items()}
    for name, module in networks.items():
        module.load_state_dict(checkpoint.network(name))
    assert checkpoint.state["replica_digests"] == [weights_digest(networks)] * 2


def wait_for_training(process, output_dir, after_step: int = 0, timeout: float = TIMEOUT) -> None:
    """Until the job has logged a step past `after_step` (its processes then handle stop signals)."""
    metrics, deadline = output_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and any(json.loads(line)["step"] > after_step
                                        for line in metrics.read_text().splitlines() if line.endswith("}"))):
        if process.poll() is not None or time.monotonic() > deadline:
            signal_tree(process.pid, signal.SIGKILL)
            pytest.fail(f"the job did not start training:\n{process.communicate()[0][-6000:]}")
        time.sleep(0.2)


def test_two_machines_on_loopback_train_save_stop_on_sigusr1_requeue_and_resume(tmp_path):
    """Two runs of the job, as SLURM runs it again after a requeue (the same id, so the same directory): the first
    trains until SIGUSR1 makes it save and requeue; the second resumes from that checkpoint and finishes."""
    env = two_cpu_machines(tmp_path, ["127.0.0.1", "127.0.0.2"])
    job = start(["bash", "launch/slurm/multi_node.sbatch", *tiny_flags(max_steps=100_000, log_every=2)], env, REPO)
    wait_for_training(job, job_dir(tmp_path), after_step=2)
    signal_job_step(env, signal.SIGUSR1)  # SLURM, 300 s before the time limit
    code, output = finish(job, TIMEOUT)
    assert output.count("2 processes on 2 nodes, cpu") == 1, output[-6000:]  # only the job's main process prints
    assert "stopped by SIGUSR1" in output and f"exitcode  : {Ending.PREEMPTED}" in output, output[-6000:]
    # Each node's agent outlived the signal and reported its process's exit 75 as 1; killed by SIGUSR1 it would
    # have ended at once with 138, before the checkpoint.
    assert code == 1 and task_exits(env, nodes=2) == [[1], [1]], output[-6000:]
    # once, from the main process; requeued under the same id, not submitted anew
    assert [call for call in calls(env, "scontrol") if not call.startswith("show ")] == [f"requeue {JOB_ID}"]
    assert calls(env, "sbatch") == []
    saved = final_checkpoint(job_dir(tmp_path))
    step = saved.state["position"]["step"]
    assert step > 2 and saved.state["world_size"] == 2
    assert_replicas_hold_the_saved_weights(saved)

    output = run_job(env, *tiny_flags(max_steps=step + 4, log_every=2))
    assert f"resume: from {saved.path} (step {step}," in output
    last = final_checkpoint(job_dir(tmp_path))
    assert last.state["position"]["step"] == step + 4 and last.state["world_size"] == 2
    assert_replicas_hold_the_saved_weights(last)
    steps = [m["step"] for m in read_metrics(job_dir(tmp_path))]  # every 2 steps and the last; none twice
    assert steps == sorted({*range(2, step + 5, 2), step + 4}), steps


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2: two hosts without a shared
    loopback. Yields, per namespace, the command words that run a command inside it, as that host."""
    tag = f"vg{os.getpid() % 100000}"
    names, links = [f"{tag}a", f"{tag}b"], [f"{tag}va", f"{tag}vb"]
    setup = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
             ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for i in range(2):
        setup += [["ip", "link", "set", links[i], "netns", names[i]],
                  ["ip", "-n", names[i], "addr", "add", f"10.77.0.{i + 1}/24", "dev", links[i]],
                  ["ip", "-n", names[i], "link", "set", links[i], "up"],
                  ["ip", "-n", names[i], "link", "set", "lo", "up"]]
    try:
        for command in setup:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"cannot make network namespaces here ({' '.join(command)}: {result.stderr.strip()})")
        # Gloo binds the veth address, and each agent publishes it to the others (torch's PET_LOCAL_ADDR),
        # not the address its hostname resolves to, which is the same in both namespaces.
        yield [f"ip netns exec {names[i]} env GLOO_SOCKET_IFNAME={links[i]} PET_LOCAL_ADDR=10.77.0.{i + 1}"
               for i in range(2)]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_two_machines_on_a_veth_pair_meet_at_the_head_address(tmp_path, two_namespaces):
    env = two_cpu_machines(tmp_path, ["10.77.0.1", "10.77.0.2"], FAKE_NODE_PREFIX_0=two_namespaces[0],
                           FAKE_NODE_PREFIX_1=two_namespaces[1])
    output = run_job(env, *tiny_flags(max_steps=4, log_every=2))
    assert output.count("2 processes on 2 nodes, cpu") == 1
    assert [m["step"] for m in read_metrics(job_dir(tmp_path))] == [2, 4]


def test_local_launcher_trains_with_cpu_processes(tmp_path):
    env = job_env(tmp_path, install_doubles(tmp_path), nodes=1, hostnames=["localhost"], CUDA_VISIBLE_DEVICES="")
    code, output = run(["bash", REPO / "launch/local.sh", *tiny_flags(max_steps=4, log_every=2, output_dir="out")],
                       env, cwd=tmp_path, timeout=TIMEOUT)
    assert code == 0, output[-6000:]
    assert "2 processes on 1 node, cpu" in output
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [2, 4]
