#!/usr/bin/env bash
# Table 1 at the GPU scale (issue 15 item 1) in one device call: the five families of one size (oryx-tg, oryx-tm and
# their parameter-matched transformer, gdn, mamba2 baselines) trained at once in separate processes on one card, with
# the same data (prose:train, bpe:4096), batch, steps, tokens and seed, then evaluated on the card.
#
#   bash benchmarks/lm_gpu.sh                     # from the repository root; results in $OUT (default ./out)
#   SEED=1 bash benchmarks/lm_gpu.sh              # the second seed
#   TAG=lr2x-s0 LRS="oryx-tg=0.012 oryx-tm=0.012 transformer=0.006 gdn=0.006 mamba2=0.006" bash benchmarks/lm_gpu.sh
#
# 0. tokenise the embedded corpus (shipped compressed in the package) once into the token cache.
# 1. probe: the five train at once for PROBE_SECONDS of wall time (compile and warm-up included) and are stopped
#    together, so that the last third of every family's steps ran while all five shared the card, as the real runs
#    will (a probe of a fixed step count let the first family to compile time itself on an emptier card). Each one's
#    steady tokens/s (median of that last third) gives one shared step count, what the slowest family fits into
#    TRAIN_MINUTES. Printed with the tokens per parameter it reaches; every family trains it.
# 2. train: `oryx train --preset <family>-$SIZE` at those steps, the paper's recipe (Oryx on random 128-token chunks, a
#    quarter in attention; LR 10x GPT-3's for Oryx, 5x for the baselines unless LRS names one), compiled with CUDA
#    graphs (oryx train's default on one GPU).
# 3. evaluate on the card: perplexity and bits per byte on prose:test (held-out documents) and brown:test (another
#    domain) in each single mode, at the last step and at the checkpoint of the lowest validation perplexity (every
#    run validates and saves at each eighth of its steps and at its end, and keeps those nine checkpoints), the
#    zero-shot tasks, NIAH-1/2/3 and record recall (attention, linear and cross-mode), and the switching curves of
#    the Oryx models (lm_cpu.py's positions and schedules): the commands of benchmarks/lm_cpu.py, on cuda.
# Resumable: rerun with the same RUNS (default /tmp/lm-gpu) and it keeps the probe's step count (RUNS/steps.json),
# skips finished runs and resumes the others from their last checkpoint.
# $OUT gets lm_gpu.log, results.tar.gz (steps.json: the probe and the shared steps; every run's metrics.jsonl,
# train_config.yaml and evaluation outputs) and models-$TAG.tar.gz.part* (the models of EXPORT_FAMILIES, see
# export_models). SIZE (default small), BATCH (32), SEQ_LEN (512), TRAIN_MINUTES (4), PROBE_SECONDS (150), SEED (0),
# EVAL_TOKENS (131072 per split and mode), ZEROSHOT_N (500), RETRIEVAL_N (50), RETRIEVAL_LENGTHS (512 1024) and DEVICE
# (cuda; `DEVICE=cpu SIZE=tiny` with small counts is this script's dry run) shape it; WALL_SECONDS (570) bounds every
# stage, so that what was measured is packed before the device call's limit. EVALS (default "ppl switching retrieval
# zeroshot") names the evaluations to run: an LR point needs only `ppl` (it chooses on validation, and reports test
# and out-of-domain perplexity at the best checkpoint). ROUTER_FAMILIES (default none; e.g.
# oryx-tg) then trains each one's router and measures perplexity, NIAH and record recall against the budget.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
RUNS=${RUNS:-/tmp/lm-gpu}
SIZE=${SIZE:-small} BATCH=${BATCH:-32} SEQ_LEN=${SEQ_LEN:-512} SEED=${SEED:-0} DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-4} PROBE_SECONDS=${PROBE_SECONDS:-150}
EVAL_TOKENS=${EVAL_TOKENS:-131072} ZEROSHOT_N=${ZEROSHOT_N:-500} RETRIEVAL_N=${RETRIEVAL_N:-50}
RETRIEVAL_LENGTHS=${RETRIEVAL_LENGTHS:-512 1024}  # prompt tokens; the models train on 512
FAMILIES=${FAMILIES:-oryx-tg oryx-tm transformer gdn mamba2}
EVALS=${EVALS:-ppl switching retrieval zeroshot}
for name in $EVALS; do
  case $name in ppl|switching|retrieval|zeroshot) ;; *)
    echo "error: EVALS takes ppl, switching, retrieval and zeroshot, got '$name'" >&2; exit 2;; esac
done
wants() { case " $EVALS " in *" $1 "*) return 0;; esac; return 1; }
# Runs are <family>-$TAG. An LR point needs its own tag, or its runs would be read as the recipe's seed.
TAG=${TAG:-s$SEED}
if [ -n "${LRS:-}" ] && [ "$TAG" = "s$SEED" ]; then
  echo "error: LRS needs a TAG of its own (e.g. TAG=lr2x-s$SEED), so that its runs are not taken for the recipe's" >&2
  exit 2
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export ORYX_CACHE_DIR=${ORYX_CACHE_DIR:-$RUNS/cache} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$RUNS/inductor}
ORYX=(python3 -m oryx.cli)
exec > >(tee -a "$OUT/lm_gpu.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "device: $DEVICE"
start=$(date +%s)
# Every stage ends by WALL_SECONDS (default 570, inside a 10-minute device call), so the results are always packed:
# exporting and packing five models after the last stage took ~35 s on the H200's host.
deadline=$(( start + ${WALL_SECONDS:-570} - 50 ))
left() { local n=$(( deadline - $(date +%s) )); echo $(( n > 1 ? n : 1 )); }
lr_of() { for pair in ${LRS:-}; do [ "${pair%%=*}" = "$1" ] && echo "--lr ${pair#*=}"; done; }
pack() { (cd "$RUNS" && tar -czf "$OUT/results.tar.gz" --exclude='checkpoints' ./*-"$TAG" ./*.log steps.json); }
# The models of EXPORT_FAMILIES (weights, config, tokenizer; no optimizer) as save_pretrained folders, in parts of
# 15 MiB: `cat models-s0.tar.gz.part* | tar -xz` gives models/<family>-s0, which every `oryx eval` command and `oryx
# train-router` take, so evaluation and router work can go on elsewhere. The device returns at most 16 MiB a file and
# 64 MiB in all: three small fp32 models (~17.5 MB each compressed) fit, five do not (seed 1 lost two that way).
export_models() {
  local family
  for family in ${EXPORT_FAMILIES-oryx-tg oryx-tm transformer}; do  # EXPORT_FAMILIES= exports none
    case " $FAMILIES " in *" $family "*) ;; *) continue;; esac  # a family this call did not train
    python3 -c "
import sys
from oryx.checkpoint import load_pretrained
model, tokenizer, _ = load_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[2])  # before the model: its checksums.json then lists the tokenizer too
model.save_pretrained(sys.argv[2])
" "$RUNS/$family-$TAG" "$RUNS/models/$family-$TAG" || echo "FAILED: exporting $family-$TAG"
  done
  [ -d "$RUNS/models" ] && (cd "$RUNS" && tar -czf - models) | split -b 15M -d - "$OUT/models-$TAG.tar.gz.part"
}
finished() { grep -qs '"kind": "final"' "$RUNS/$1-${2:-$TAG}/metrics.jsonl"; }  # FAMILY [TAG]: its run ended
# train_all STEPS TAG: every family at once, STEPS steps each, into $RUNS/<family>-<TAG>; fails if one does. The probe
# (TAG probe) instead runs until PROBE_SECONDS stop all five at once.
train_all() {
  local steps=$1 tag=$2 family pids=() pid rc failed=0 again limit eighth=$(( $1 > 8 ? $1 / 8 : $1 ))
  for family in $FAMILIES; do
    # A probe starts afresh; a real run that stopped goes on from its last checkpoint, and a finished one is kept.
    again=(); limit=$(left); [ "$tag" = probe ] && again=(--overwrite) limit=$PROBE_SECONDS
    if [ "$tag" != probe ] && [ -d "$RUNS/$family-$tag/checkpoints" ]; then again=(--resume); fi
    if [ "$tag" != probe ] && finished "$family" "$tag"; then continue; fi
    timeout "$limit" "${ORYX[@]}" train --preset "$family-$SIZE" --steps "$steps" --batch-size "$BATCH" \
      --seq-len "$SEQ_LEN" --seed "$SEED" $(lr_of "$family") --device "$DEVICE" --eval-every "$eighth" \
      --save-every "$eighth" --keep-checkpoints 9 --no-report --no-progress \
      --out-dir "$RUNS/$family-$tag" "${again[@]}" > "$RUNS/$family-$tag.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do  # by pid: a plain `wait` would wait for the log's tee too
    wait "$pid"; rc=$?; [ "$rc" = 0 ] || { [ "$tag" = probe ] && [ "$rc" = 124 ]; } || failed=1
  done
  for family in $FAMILIES; do echo "== $family-$tag: $(tail -n 2 "$RUNS/$family-$tag.log" | tr '\n' ' ')"; done
  return $failed
}

mkdir -p "$RUNS"
# Tokenise once, before five processes would each do it: the BPE and every split's token stream go to ORYX_CACHE_DIR.
python3 -c "
from oryx.data import load_tokenizer, load_tokens
tokenizer = load_tokenizer('bpe:4096')
for source in ('prose:train', 'prose:validation', 'prose:test', 'brown:test'):
    print(source, f'{len(load_tokens(source, tokenizer)):,} tokens')
" || { echo "FAILED: tokenising the corpus"; exit 1; }
if [ -f "$RUNS/steps.json" ]; then  # a rerun resumes at the step count its probe set
  STEPS=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['steps'])" "$RUNS/steps.json")
  echo "=== the earlier probe's $STEPS steps ($RUNS/steps.json)"
else
echo "=== probe: every family at once for $PROBE_SECONDS s $(date +%T)"
train_all 1000000 probe || { echo "FAILED: a probe run (its log above)"; exit 1; }
STEPS=$(python3 - "$RUNS" "$SIZE" "$BATCH" "$SEQ_LEN" "$TRAIN_MINUTES" "$RUNS/steps.json" $FAMILIES <<'EOF'
import json, statistics, sys
from pathlib import Path

import torch

from oryx import OryxConfig, OryxForCausalLM
from oryx.data import load_tokenizer, load_tokens

runs, size, batch, seq_len, minutes, out, *families = sys.argv[1:]
tokens_per_step = int(batch) * int(seq_len)
train_tokens = len(load_tokens("prose:train", load_tokenizer("bpe:4096")))  # from the token cache
probe, params = {}, {}
for family in families:
    records = [json.loads(line) for line in (Path(runs) / f"{family}-probe" / "metrics.jsonl").open()]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"]
    if len(rates) < 12:
        sys.exit(f"{family}'s probe made {len(rates)} steps in its time: give PROBE_SECONDS more (its log above)")
    probe[family] = statistics.median(rates[-(len(rates) // 3) :])
    with torch.device("meta"):
        model = OryxForCausalLM(OryxConfig.from_preset(f"{family}-{size}", vocab_size=4096))
    params[family] = sum(p.numel() for p in model.parameters())
slowest = min(probe, key=probe.get)
steps = max(1, int(float(minutes) * 60 * probe[slowest] / tokens_per_step))
for family in families:
    tokens = steps * tokens_per_step
    print(f"{family}: probe {probe[family]:,.0f} tokens/s, {params[family]:,} parameters, "
          f"{tokens:,} tokens = {tokens / params[family]:.1f} per parameter", file=sys.stderr)
epochs = steps * tokens_per_step / train_tokens
print(f"every family trains {steps} steps of {tokens_per_step:,} tokens (what {slowest}, the slowest, fits into "
      f"{minutes} min): {epochs:.1f} epochs of prose:train's {train_tokens:,} tokens", file=sys.stderr)
Path(out).write_text(json.dumps({"steps": steps, "tokens_per_step": tokens_per_step, "probe_tokens_per_s": probe,
                                 "parameters": params, "slowest": slowest, "train_minutes": float(minutes),
                                 "train_tokens": train_tokens, "epochs": epochs}, indent=1))
print(steps)
EOF
) || { echo "FAILED: reading the probes' metrics"; exit 1; }
fi
echo "=== train: $STEPS steps, seed $SEED, runs <family>-$TAG $(date +%T)"
# A run that failed (diverged at a high LR, or was cut by the wall time) is reported and left out of the evaluation;
# the others are evaluated. Rerun the script with the same RUNS to resume a cut one.
train_all "$STEPS" "$TAG" || echo "FAILED: a training run (its log above); the finished ones are evaluated"

echo "=== evaluate $(date +%T)"
# The switch positions (aligned to 128 and not) and multi-switch schedules of the CPU scale (benchmarks/lm_cpu.py),
# where they fit in SEQ_LEN (not in a dry run's short windows: those get eval switching's defaults).
mapfile -t SWITCHING < <(python3 -c "
import sys
sys.path.insert(0, 'benchmarks')
from lm_cpu import SWITCH_AT, SWITCH_SCHEDULES
if max(SWITCH_AT) < int(sys.argv[1]):
    print('\n'.join(['--switch-at', *map(str, SWITCH_AT), '--schedule', *SWITCH_SCHEDULES]))" "$SEQ_LEN")
pids=()
for family in $FAMILIES; do
  finished "$family" || { echo "== $family-$TAG: not finished, not evaluated"; continue; }
  run=$RUNS/$family-$TAG; ev=$run/eval; mkdir -p "$ev"
  case $family in oryx-*) modes="attn linear";; transformer) modes=attn;; *) modes=linear;; esac
  (if wants ppl; then
     for split in test:prose:test ood:brown:test; do
       timeout "$(left)" "${ORYX[@]}" eval ppl "$run" --data "${split#*:}" --schedule $modes \
         --max-tokens "$EVAL_TOKENS" --device "$DEVICE" --json "$ev/ppl-${split%%:*}.json"
     done
     # The same at the checkpoint of the lowest validation perplexity (lm_gpu_tables.best_record): the corpus is seen
     # many times over, and the families overfit at different speeds.
     best=$(python3 -c "
import json, sys
sys.path.insert(0, 'benchmarks')
from lm_gpu_tables import best_record
records = [json.loads(line) for line in open(sys.argv[1] + '/metrics.jsonl')]
print(f\"{sys.argv[1]}/checkpoints/step-{best_record(records).get('step', 0):08d}\")" "$run")
     for split in test:prose:test ood:brown:test; do
       [ -d "$best" ] && timeout "$(left)" "${ORYX[@]}" eval ppl "$best" --data "${split#*:}" --schedule $modes \
         --max-tokens "$EVAL_TOKENS" --device "$DEVICE" --json "$ev/ppl-best-${split%%:*}.json"
     done
   fi
   case $family in oryx-*) wants switching && timeout "$(left)" "${ORYX[@]}" eval switching "$run" \
     --data prose:test "${SWITCHING[@]}" --device "$DEVICE" --out "$ev/switching";; esac
   # Recall was 0 for every family at the small size (seed 1, 2026-12-02): after switching, which measures something.
   wants retrieval && timeout "$(left)" "${ORYX[@]}" eval retrieval "$run" --n "$RETRIEVAL_N" \
     --lengths $RETRIEVAL_LENGTHS --device "$DEVICE" --out "$ev/retrieval"
   # Last: near chance at this scale (seed 0: lambada 2-5 %), and the slowest for Oryx on the card.
   wants zeroshot && timeout "$(left)" "${ORYX[@]}" eval zeroshot "$run" --modes $modes --n "$ZEROSHOT_N" \
     --device "$DEVICE" --out "$ev/zeroshot") > "$run.eval.log" 2>&1 &
  pids+=($!)
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
python3 benchmarks/lm_gpu_tables.py "$RUNS" || echo "FAILED: no run was evaluated (see $RUNS/*.eval.log)"
export_models
for family in ${ROUTER_FAMILIES:-}; do  # issue 14 on a GPU-scale LM: a router, then quality against the budget
  run=$RUNS/$family-$TAG
  (timeout "$(left)" "${ORYX[@]}" train-router "$run" --device "$DEVICE" &&
   timeout "$(left)" "${ORYX[@]}" eval budget "$run" --tasks ppl niah_1 niah_2 records_kv --n "$RETRIEVAL_N" --cost \
     --max-tokens "$EVAL_TOKENS" --device "$DEVICE" --out "$run/eval/budget") > "$run.budget.log" 2>&1 ||
    echo "== $family: FAILED router or budget (see $run.budget.log)"
done
pack
echo "wall: $(( $(date +%s) - start )) s"
