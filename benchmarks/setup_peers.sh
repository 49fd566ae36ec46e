#!/usr/bin/env bash
# A separate virtual environment for the peer comparison (torchaudio's rnnt_loss beside rnnt_xla).
#
#     bash benchmarks/setup_peers.sh                 # venv at ${PEERS_VENV:-$HOME/.venvs/rnnt-peers}
#     "$HOME/.venvs/rnnt-peers/bin/python" benchmarks/bench_cpu.py
#
# torchaudio's wheels are built against one torch release each; the newest pair that installs here is
# torch 2.9.1 + torchaudio 2.9.x. The project's main environment keeps torch 2.13.0, so the peers get their
# own venv, outside the repository. On x86_64, PyPI's torch 2.9.1 is a CUDA build (about 7 GB in the venv);
# it runs on the CPU all the same. rnnt_xla's torch extra (torch>=2.1,<=2.13.0) is satisfied by 2.9.1.
#
# Environment: PEERS_VENV (venv path), PYTHON (interpreter that creates it, default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEERS_VENV:-$HOME/.venvs/rnnt-peers}"
PYTHON="${PYTHON:-python3}"

case "$VENV" in
  "$REPO"|"$REPO"/*) echo "PEERS_VENV must lie outside the repository ($REPO)" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# torchvision first, with its matching torch (the order the machine notes give), then torchaudio with the
# same torch pinned so pip cannot move it.
"${PIP[@]}" 'torch==2.9.1' 'torchvision==0.24.1'
"${PIP[@]}" 'torch==2.9.1' 'torchaudio==2.9.*'
# rnnt_xla from this checkout (editable: benchmarks always measure the working tree), JAX, the bench extras
# (rich, matplotlib), and the seed. torch stays pinned.
"${PIP[@]}" 'torch==2.9.1' -e "$REPO[jax,bench]" numba 'warprnnt-numba==0.4.1'

echo "checking the peers import and agree on a small case"
"$VENV/bin/python" - <<'EOF'
import torch, torchaudio, jax, numba
import torchaudio.functional as F
import rnnt_xla.torch as rt

x = torch.randn(2, 10, 4, 8, requires_grad=True)
y = torch.randint(1, 8, (2, 3), dtype=torch.int32)
n = torch.full((2,), 10, dtype=torch.int32)
m = torch.full((2,), 3, dtype=torch.int32)
a = F.rnnt_loss(x, y, n, m, blank=0, reduction="none")
b = rt.rnnt_loss(x, y, n, m, blank=0, reduction="none")
assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a, b)
print(f"ok: torch {torch.__version__}, torchaudio {torchaudio.__version__}, jax {jax.__version__}, "
      f"numba {numba.__version__}; torchaudio and rnnt_xla agree: {b.tolist()}")
EOF
echo "run the benchmark with: $VENV/bin/python $REPO/benchmarks/bench_cpu.py"
