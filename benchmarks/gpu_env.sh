# Sourced by the GPU scripts: output folder, a work folder, and the import path. On a machine whose
# Python lacks nibabel, wheels placed in .whl/ are installed to a private folder first.
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import nibabel" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "${TMPDIR:-/tmp}/dgseg_site" .whl/*.whl
  export PYTHONPATH="${TMPDIR:-/tmp}/dgseg_site"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
work=${WORK:-${TMPDIR:-/tmp}/dgseg_gpu}
mkdir -p "$work"
nvidia-smi -L | tee "$OUT/gpu.txt"
