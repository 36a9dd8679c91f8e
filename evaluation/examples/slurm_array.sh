#!/bin/bash
# One prompt shard per array task; every task writes its own directory, a last job merges.
#   sbatch --array=0-7 evaluation/examples/slurm_array.sh evaluation/examples/nudity_sd14_duo.toml runs/nudity
#   sbatch --dependency=afterok:<array job id> --wrap \
#     "python -m evaluation merge evaluation/examples/nudity_sd14_duo.toml --out runs/nudity/merged runs/nudity/shard-*"
# Re-submitting a failed or pre-empted task resumes it: finished images are never recomputed.
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
set -euo pipefail
CONFIG="$1"; RUNS="$2"
N="${SLURM_ARRAY_TASK_COUNT:?submit with --array=0-(N-1)}"
I="${SLURM_ARRAY_TASK_ID}"
cd "$(dirname "$0")/../.."   # repository root (the pack folder inside ComfyUI/custom_nodes)
python -m evaluation run "$CONFIG" --out "$RUNS/shard-$I" --shard "$I/$N" --comfyui "${COMFYUI_PATH:?set COMFYUI_PATH}"
