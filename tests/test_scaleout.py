"""Scale-out on the existing engines: DeepSpeed (``accelerate launch --use_deepspeed``) is refused with an error
that names FSDP and the ZeRO-2/3 sharding strategies that replace it (DeepSpeed needs CUDA and is not installed
here, so the accelerator reports the DeepSpeed distributed type through a patched property); multi-node through
torchrun (2 nodes on localhost, 1 process each) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from accelerate import Accelerator
from accelerate.utils import DistributedType

from tests.test_multiprocess import ROOT, _assert_same, _ckpt, _free_port, one_process  # noqa: F401 (fixture)
from tests.test_trainer import tiny_cfg


def test_deepspeed_launch_names_fsdp_as_the_equivalent(tmp_path, monkeypatch):
    from flowalign.trainer import Trainer

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(NotImplementedError, match=r"--use_deepspeed.*FSDP is the equivalent: ZeRO-2 -> .*"
                                                  r"SHARD_GRAD_OP.*ZeRO-3 -> .*FULL_SHARD"):
        Trainer(tiny_cfg(tmp_path))


@pytest.mark.slow
def test_two_nodes_torchrun_match_one_process(one_process, tmp_path):
    """Multi-node: ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1}`` on a localhost rendezvous (two
    launcher subprocesses, one per "node") makes the same update as one process (``tests/test_multiprocess``)."""
    recipe, ckpts = one_process
    two, port = tmp_path / "nodes", _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "flowalign.cli", "train", str(recipe), f"output_dir={two}", "cpu=false"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    c2 = _ckpt(two, 2)
    assert (c2 / "rng_1.pt").is_file() and json.loads((c2 / "state.json").read_text())["world_size"] == 2
    _assert_same(ckpts / c2.name, c2)
