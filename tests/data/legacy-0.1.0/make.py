"""Writes the fixtures of tests/test_compat.py with Oryx 0.1.0 (commit 75ab09c, before recurrences became components):
one tiny save_pretrained model per variant with the logits it gives on fixed inputs, and a mamba2 training checkpoint
with the losses of the uninterrupted run. Run from a checkout of that commit:
    PYTHONPATH=src python make.py OUT_DIR WORK_DIR
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch

import oryx
from oryx.data import load_documents
from oryx.training import TrainConfig, train
from oryx.training.trainer import read_metrics

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for variant in ["tg", "tm", "transformer", "gdn", "mamba2"]:
    torch.manual_seed(0)
    cfg = oryx.OryxConfig(
        variant=variant,
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=1,
        head_dim=16,
        chunk_size=8,
        mamba_head_dim=8,
        mamba_d_state=16,
        gdn_num_heads=2,
        gdn_head_dim_v=24,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    model = oryx.OryxForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "A_log"):
                m.A_log.uniform_(-1.0, 1.5)
                m.dt_bias.uniform_(-3.0, 1.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 20), generator=g)
    modes = torch.randint(0, 2, (2, 20), generator=g) if variant in ("tg", "tm") else None
    with torch.no_grad():
        logits = model(ids, modes=modes).logits
    model.save_pretrained(out / variant)
    torch.save({"input_ids": ids, "modes": modes, "logits": logits}, out / variant / "expected.pt")
# training runs of 6 steps, checkpoints at 3 and 6: mamba2 (its fused projection is split on load) and oryx-tg
text = "\n\n".join(doc.text for doc in load_documents("validation"))
torch.set_num_threads(1)
for preset, extra in (("mamba2-tiny", {}), ("oryx-tg-tiny", {"schedule": "chunks:size=4,p_attn=0.5"})):
    work = Path(sys.argv[2]) / preset
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    Path("train.txt").write_text(text[:900])
    Path("val.txt").write_text(text[-1500:])
    os.environ["ORYX_CACHE_DIR"] = str(work / "cache")
    cfg = TrainConfig.from_dict(
        dict(
            preset=preset,
            hidden_size=64,
            num_hidden_layers=1,
            train_data="train.txt",
            val_data="val.txt",
            tokenizer="byte",
            seq_len=16,
            batch_size=2,
            steps=6,
            eval_every=3,
            save_every=3,
            keep_checkpoints=2,
            eval_tokens=64,
            report=False,
            progress=False,
            tensorboard=False,
            threads=1,
            out_dir="run",
            **extra,
        )
    )
    train(cfg)
    losses = {r["step"]: r["loss"] for r in read_metrics("run") if r["kind"] == "train"}
    ck = out / f"{preset.split('-')[-2]}-run"
    shutil.copytree("run/checkpoints/step-00000003", ck / "step-00000003")
    shutil.copy("train.txt", ck)
    shutil.copy("val.txt", ck)
    (ck / "losses.json").write_text(json.dumps(losses))
