"""Calibration under torch.distributed: every rank ends with the same steps."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qdetr.quant import calibrate, quantize_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different weights and data on every rank
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        quantize_model(model, bits=4)
        # rank 0 sees only non-negative inputs, rank 1 also negative ones
        x = torch.rand(2, 3, 9, 9) if rank == 0 else torch.randn(2, 3, 9, 9) * 2
        calibrate(model, [x])
        state = {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k}
        # reference statistics computed locally, to compare with the all-reduced ones
        state["local_min"] = x.min()
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_calibration_is_synchronised(tmp_path):
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in s0:
        if key == "local_min":
            continue
        assert torch.equal(s0[key], s1[key]), key
    # alone, rank 0 would have chosen an unsigned stem input; the global minimum decides for both
    assert float(s0["local_min"]) >= 0 > float(s1["local_min"])
    assert int(s0["0.input_quantizer.signed"]) == int(s1["0.input_quantizer.signed"]) == 1
