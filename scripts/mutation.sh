#!/usr/bin/env bash
# Mutation testing of the pure core with cosmic-ray; writes mutation/REPORT.md.
#
#   scripts/mutation.sh [MODULE ...]               # default: every module below, in this order
#   scripts/mutation.sh --survivors [MODULE ...]   # re-test only the last run's survivors
#   scripts/mutation.sh --unexplained [MODULE ...] # … only those without a reason in survivors.toml
#   scripts/mutation.sh --resume MODULE ...         # continue an interrupted full run
#
# One config per module, mutation/MODULE.toml: the file to mutate, a per-mutant timeout, and a
# test command that runs only the fast unit tests covering it. Not part of CI (docs/DEVELOPMENT.md).
# --survivors reuses mutation/sessions/MODULE.sqlite (refused if the module changed since):
# adding tests can only turn survivors into kills, so the rest of the session stays valid.
# A full run stopped by Ctrl-C or SIGTERM keeps what it did in mutation/sessions/MODULE.partial.*;
# --resume runs only the mutants not yet tested (refused if the module changed since), so a long
# module can be done across several sittings; its time is the sum of the parts.
#
# cosmic-ray edits the module on disk for each mutant. It runs here on a scratch copy of the
# working tree (src, tests, pyproject.toml, mutation), with PYTHONPATH pointing at that copy, so the
# checkout, and anyone running tests on it meanwhile, never sees a mutant. One worker, under
# nice, torch on one thread: the machine is shared. Needs `pip install -e ".[test,mutation]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
ALL=(privacy selection aggregation lowrank payload validation budgets secure_sum private audit ledger)
mode=full which=all
if [ "${1:-}" = "--survivors" ]; then mode=survivors; shift
elif [ "${1:-}" = "--unexplained" ]; then mode=survivors which=unexplained; shift
elif [ "${1:-}" = "--resume" ]; then mode=resume; shift; fi
mods=("$@")
[ ${#mods[@]} -gt 0 ] || mods=("${ALL[@]}")
for m in "${mods[@]}"; do
  [ -f "mutation/$m.toml" ] || { echo "mutation.sh: no mutation/$m.toml (modules: ${ALL[*]})" >&2; exit 2; }
  [ "$mode" != survivors ] || [ -f "mutation/sessions/$m.sqlite" ] || {
    echo "mutation.sh: --survivors: $m has no session yet; run scripts/mutation.sh $m" >&2; exit 2; }
  [ "$mode" != resume ] || [ -f "mutation/sessions/$m.partial.sqlite" ] || {
    echo "mutation.sh: --resume: $m has no interrupted run; run scripts/mutation.sh $m" >&2; exit 2; }
done
"$PY" -c "import cosmic_ray" 2>/dev/null || {
  echo "mutation.sh: cosmic-ray is missing; run: $PY -m pip install -e '.[mutation]'" >&2; exit 2; }

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lora-a2-mutation.XXXXXX")
SERVER= CHILD= CURRENT=
cleanup() {
  [ -z "$CHILD" ] || kill "$CHILD" 2>/dev/null || true
  [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
# Long steps run in the background and are waited for, so that an interrupt stops them at once.
run() { "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=; return $rc; }
# An interrupted full (or resumed) run keeps its session for --resume. (fd 3 is the script's own
# stdout: a trap runs inside `run`, whose output may be redirected to a log.)
exec 3>&1
interrupted() {
  [ -z "$CHILD" ] || kill "$CHILD" 2>/dev/null || true
  wait "$CHILD" 2>/dev/null || true; CHILD=
  if [ -n "$CURRENT" ] && [ "$mode" != survivors ] && [ -f "$session" ]; then
    "$PY" mutation/report.py save-partial "$CURRENT" "$session" $(( $(date +%s) - start )) \
      "$commit" "$dirty" "$fingerprint" >&3 2>&1 || true
  fi
  exit 130
}
trap cleanup EXIT
trap interrupted INT TERM

tar -C "$ROOT" --exclude=__pycache__ --exclude=.hypothesis --exclude=mutation/sessions \
  -cf - src tests pyproject.toml mutation | tar -C "$WORK" -xf -
ln -s "$VENV" "$WORK/.venv"
mkdir -p "$ROOT/mutation/sessions"
commit=$(git rev-parse --short HEAD)

# The fork server keeps torch imported between mutants (mutation/fastpytest.py explains).
export PYTHONPATH=$WORK/src MUTATION_PYTEST_SOCKET=$WORK/pytest.sock MUTATION_SESSIONS=$ROOT/mutation/sessions
(cd "$WORK" && exec nice -n 15 "$PY" mutation/fastpytest.py serve "$MUTATION_PYTEST_SOCKET") \
  >"$ROOT/mutation/sessions/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do [ -S "$MUTATION_PYTEST_SOCKET" ] && break; sleep 0.2; done
[ -S "$MUTATION_PYTEST_SOCKET" ] || { echo "mutation.sh: the fork server did not start" >&2; exit 1; }

cd "$WORK"
for m in "${mods[@]}"; do
  # The run's files that differ from HEAD (they are what was tested, not HEAD's version).
  mapfile -t deps < <("$PY" mutation/report.py files "$m")
  dirty=$(git -C "$ROOT" status --porcelain -- "${deps[@]}" | awk '{print $NF}' | paste -sd, -)
  session=$WORK/$m.sqlite
  log=$ROOT/mutation/sessions/$m.log
  echo "mutation.sh: $m, $mode run ($(date '+%H:%M:%S'))"
  start=$(date +%s)
  fingerprint=$("$PY" mutation/report.py fingerprint "$m")
  if [ "$mode" = full ]; then
    run nice -n 15 "$VENV/bin/cosmic-ray" init "mutation/$m.toml" "$session" --force
  elif [ "$mode" = resume ]; then
    "$PY" mutation/report.py resume-partial "$m" "$session"
  else
    cp "$ROOT/mutation/sessions/$m.sqlite" "$session"
    "$PY" mutation/report.py reopen "$m" "$session" "$which"
  fi
  "$PY" mutation/report.py skip-annotations "$m" "$session"
  if ! run nice -n 15 "$VENV/bin/cosmic-ray" baseline "mutation/$m.toml" >"$log.$mode" 2>&1; then
    cat "$log.$mode" >&2; echo "mutation.sh: $m: the tests fail without any mutation" >&2; exit 1
  fi
  CURRENT=$m
  run nice -n 15 "$VENV/bin/cosmic-ray" exec "mutation/$m.toml" "$session" >>"$log.$mode" 2>&1
  CURRENT=
  seconds=$(( $(date +%s) - start ))
  cp "$session" "$ROOT/mutation/sessions/$m.sqlite"
  rec=$mode; [ "$which" = all ] || rec=$which
  "$PY" mutation/report.py record "$m" "$rec" "$seconds" "$commit" "$dirty"
  if [ "$mode" = resume ]; then
    echo "mutation.sh: $m done; this part took ${seconds}s (the report adds the earlier parts)"
  else
    echo "mutation.sh: $m done in ${seconds}s"
  fi
done
cd "$ROOT"
"$PY" mutation/report.py render
echo "mutation.sh: wrote mutation/REPORT.md"
