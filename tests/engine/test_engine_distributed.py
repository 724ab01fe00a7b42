"""Two CPU processes under torchrun (gloo): DDP training, synced quantizers, distributed eval."""

import json
import os
import subprocess
import sys


from qdetr.engine import Trainer

from .conftest import tiny_config


def test_torchrun_two_processes_qat_with_distillation(tmp_path, synthetic_root):
    float_run = Trainer(tiny_config(tmp_path / "float", synthetic_root, max_steps=2, final_eval=False)).fit()
    config = tiny_config(
        tmp_path / "ddp",
        synthetic_root,
        epochs=1,
        quant={"bits": 4, "float_checkpoint": str(float_run.model_path)},
        distill={"enabled": True},
        data={"batch_size": 1},
    )
    config_path = tmp_path / "ddp.json"
    config.save(config_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "qdetr", "train", str(config_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    assert start["world_size"] == 2
    train_steps = [r for r in records if r["kind"] == "train"]
    assert len(train_steps) == 4  # 8 images / (2 ranks x batch 1)
    evaluation = next(r for r in records if r["kind"] == "eval")
    assert evaluation["num_images"] == 4  # both ranks' shards were gathered
    from qdetr.zoo import resolve_model

    final = resolve_model(tmp_path / "ddp").state_dict()
    flags = [v for k, v in final.items() if k.endswith(".initialized")]
    assert flags and all(int(v) == 1 for v in flags)
    assert "AP" in done.stdout
