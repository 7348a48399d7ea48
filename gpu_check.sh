#!/usr/bin/env bash
# The first command to run on a new GPU machine: every path that only a GPU run takes, once, on small models, with all
# GPUs of the machine (any number). The test suite runs on the CPU only; this script runs the CUDA defaults (bf16
# autocast, torch.compile of DDP-wrapped models, NCCL, TF32 convolutions) and checks what must hold there. On a machine
# without a GPU it runs the same steps with the CPU defaults and 2 gloo processes (the rehearsal CI cannot afford).
#   bash gpu_check.sh        # prints one line per check and "all checks passed"; on a failure, the end of that step's
#                            # log, and every log is kept (the folder is printed)
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXX")
trap 'rc=$?; if [ $rc -eq 0 ]; then rm -rf "$out"; else echo "gpu_check failed (exit $rc); logs kept in $out"; fi' EXIT
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
procs=$(( gpus > 0 ? gpus : 2 ))                     # processes per multi-process step: every GPU, or 2 on a CPU
name=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
echo "device: $name x $procs processes, torch $(python -c 'import torch; print(torch.__version__)')"

step() {   # step NAME COMMAND...: run it with its output in $out/NAME.log; on failure show the log's end and stop
  local name=$1; shift
  if ! "$@" > "$out/$name.log" 2>&1; then
    echo "FAILED: $name: $*"; tail -n 40 "$out/$name.log"; exit 1
  fi
}
multi() { torchrun --standalone --nproc_per_node="$procs" "$@"; }   # NCCL on GPUs, gloo on a CPU

# 1. Eq. (1) on the device: the lookup the device picks (lookup_block_elems) equals the paper's full-matrix argmin.
step lookup python - <<'EOF'
import torch
from fast import lookup_block_elems, nearest_code
from quantizer import lookup_reference
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(dev).manual_seed(0)
z, c = (torch.nn.functional.normalize(torch.randn(n, 8, device=dev, generator=g), dim=1) for n in (8192, 16384))
assert torch.equal(nearest_code(z, c), lookup_reference(z, c)), "nearest_code differs from the full-matrix argmin"
print(f"block of {lookup_block_elems(z.device, 8192, 16384, 8)} elements on {dev}")
EOF
echo "lookup: indices equal the full-matrix argmin ($(tail -1 "$out/lookup.log"))"

# 2. The tokenizer: 10 steps (bf16 + torch.compile on CUDA, GAN and entropy loss on), then 10 resumed steps; all
#    processes; the loss must stay finite (a NaN stops the run with exit 1).
gb=$(( 4 * procs ))                                  # global batch sizes divisible by any process count
tok=(--preset tiny --image-size 32 --low-res-steps 0 --global-batch-size "$gb" --num-workers 2 --gan-weight 0.5
     --gan-start 5 --log-every 5 --eval-every 10 --sample-every 10 --ckpt-every 10 --out-dir "$out/tok")
step tok multi train_tokenizer.py "${tok[@]}" --max-steps 10
step tok_resume multi train_tokenizer.py "${tok[@]}" --max-steps 20 --resume
echo "train_tokenizer, $procs processes: 10 + 10 resumed steps, $(tail -1 "$out/tok_resume.log")"
# Preemption: SIGTERM to torchrun (what a scheduler sends) stops every rank after the same step with last.pt written;
# --resume continues from there.
torchrun --standalone --nproc_per_node="$procs" train_tokenizer.py "${tok[@]}" --max-steps 100000 \
    --out-dir "$out/preempt" > "$out/preempt.log" 2>&1 &                   # $! is torchrun itself
pid=$!
for _ in $(seq 1200); do grep -qs '"step": 5,' "$out/preempt/log.jsonl" && break; sleep 0.1; done
kill -TERM "$pid"; wait "$pid" || true
grep -q "stopped by SIGTERM after step" "$out/preempt.log" \
    || { echo "FAILED: preemption"; tail -n 40 "$out/preempt.log"; exit 1; }
stopped=$(python -c "import torch, sys; print(torch.load(sys.argv[1], weights_only=True)['step'])" \
          "$out/preempt/checkpoints/last.pt")
step preempt_resume multi train_tokenizer.py "${tok[@]}" --max-steps $((stopped + 5)) --out-dir "$out/preempt" --resume
echo "preemption: SIGTERM to torchrun stopped both ranks after step $stopped, resumed to $((stopped + 5))"

# 3. IBQ (its soft one-hot, compiled on CUDA), and the paper's losses with random weights: LPIPS' two files and the
#    Triple preset's two teachers (DINOv2 ViT-S/14 through timm, CLIP ViT-B/16 through open_clip) written to a
#    temporary $FQGAN_WEIGHTS, loaded by the real code; fqgan-triple-16 at 64 px (4 x 4 tokens), GAN on.
step ibq multi train_tokenizer.py --preset tiny8-ibq --image-size 32 --low-res-steps 0 --global-batch-size "$gb" \
    --max-steps 5 --gan-weight 0.5 --gan-start 2 --log-every 5 --eval-every 100 --out-dir "$out/ibq"
echo "train_tokenizer IBQ: $(tail -1 "$out/ibq.log")"
export FQGAN_WEIGHTS="$out/weights"
step weights python - "$FQGAN_WEIGHTS" <<'EOF'
import os, sys, open_clip, timm, torch, torchvision
from losses import LPIPS
from teachers import teacher_file
os.makedirs(sys.argv[1])
vgg = torchvision.models.vgg16()                                      # random weights, torchvision's names
torch.save(vgg.state_dict(), os.path.join(sys.argv[1], "vgg16-397923af.pth"))
torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.channels)},
           os.path.join(sys.argv[1], "weights-vgg16-lpips.pth"))
dino = "timm:vit_small_patch14_dinov2.lvd142m"
torch.save(timm.create_model(dino[5:], pretrained=False, num_classes=0, img_size=224).state_dict(),
           teacher_file(dino)[1].replace(".safetensors", ".bin"))
clip = "openclip:ViT-B-16:openai"
torch.save(open_clip.create_model("ViT-B-16").state_dict(), teacher_file(clip)[1].replace(".safetensors", ".bin"))
EOF
step teachers multi train_tokenizer.py --preset fqgan-triple-16 --image-size 64 --global-batch-size "$(( 2 * procs ))" \
    --max-steps 3 --gan-start 2 --log-every 1 --num-workers 0 --data-path data/photos/train --out-dir "$out/triple"
python - "$out/triple/log.jsonl" <<'EOF'
import json, sys
last = [json.loads(line) for line in open(sys.argv[1]) if '"g/total"' in line][-1]
assert {"g/perceptual", "g/rep/1", "g/rep/2", "g/gan"} <= set(last), sorted(last)
print(f"fqgan-triple-16 with LPIPS, GAN and two random teachers: step {last['step']}, loss {last['g/total']:.3f}")
EOF
unset FQGAN_WEIGHTS

# 4. FAR on the codes of the tiny tokenizer: extraction (one shard per process) and 20 steps on all processes, then
#    10 resumed steps.
far=(--preset tiny --tokenizer-ckpt "$out/tok/checkpoints/last.pt" --global-batch-size "$(( 8 * procs ))" --log-every 10
     --eval-every 10 --sample-every 10 --ckpt-every 10 --out-dir "$out/far")
step far multi train_far.py "${far[@]}" --max-steps 20
step far_resume multi train_far.py "${far[@]}" --max-steps 30 --resume
echo "train_far, $procs processes: 20 + 10 resumed steps, $(tail -1 "$out/far_resume.log")"

# 5. Sampling with and without the compiled decode step (static KV cache): the same seed, the same PNG; then the ADM
#    npz on all processes, and evaluate.py on it (random Inception weights: the metrics' code paths, not their values)
#    and on the tiny tokenizer.
for c in compile no-compile; do
  step "sample_$c" python sample.py --far-ckpt "$out/far/checkpoints/last.pt" --class-id 0 1 --per-class 4 \
      --precision fp32 --"$c" --out "$out/$c.png"
done
# On a CPU the two are equal bit for bit (tests/test_sample.py). On a GPU, compiled kernels may sum in another order,
# which can flip a rare draw: allow one image of the 8 to differ, no more.
python - "$out" <<'EOF'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"{sys.argv[1]}/{n}.png")).astype(int) for n in ("compile", "no-compile"))
th, tw = (a.shape[0] - 2) // 2, (a.shape[1] - 2) // 4                # 2 rows of 4 images, 2-px gaps
tiles = [(a[r:r + th, c:c + tw] != b[r:r + th, c:c + tw]).any() for r in range(0, 2 * th, th)
         for c in range(0, 4 * tw, tw)]
print(f"sample.py: --compile and --no-compile differ in {sum(tiles)} of {len(tiles)} images")
assert len(tiles) == 8 and sum(tiles) <= 1
EOF
step npz multi sample.py --far-ckpt "$out/far/checkpoints/last.pt" --num-samples 32 --batch-size 8 \
    --out-npz "$out/samples.npz"
echo "sample.py npz, $procs processes: $(tail -1 "$out/npz.log")"
step inception python - "$out/inception.pth" <<'EOF'
import sys
from unittest import mock
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
    torch.save(FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), sys.argv[1])
EOF
step eval_gen multi evaluate.py --samples "$out/samples.npz" --reference "$out/samples.npz" \
    --inception-weights "$out/inception.pth" --out-json "$out/gen.json"
step eval_tok multi evaluate.py --tokenizer-ckpt weights/tiny_tokenizer.pt --out-json "$out/tok.json" --no-fid
python - "$out" <<'EOF'
import json, math, sys
gen, tok = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("gen", "tok"))
assert gen["images"] == 32 and math.isfinite(gen["fid"]) and gen["precision"] == gen["recall"] == 1.0, gen
assert tok["images"] == 40 and tok["psnr"] > 24, tok["psnr"]
print(f"evaluate.py: samples against themselves FID {gen['fid']:.1e}, precision = recall = 1; shipped tiny tokenizer "
      f"{tok['psnr']:.2f} dB on the bundled val strips")
EOF
echo "all checks passed"
