#!/usr/bin/env bash
# Run the Slicer module's self-test (RigidResNetRegistrationTest) in a real 3D Slicer.
#
#   SLICER_EXECUTABLE=/path/to/Slicer Testing/run_slicer_selftest.sh
#
# Without SLICER_EXECUTABLE it prints that the test was SKIPPED and exits 0 (the pytest suite
# covers the Logic against real MRML from slicer-core; this covers the module in the application).
# The module is loaded from this checkout (--additional-module-paths); PyTorch must be installed in
# Slicer's Python (PyTorch extension, or pip_install) because --testing installs nothing silently.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${SLICER_EXECUTABLE:-}" ]; then
  echo "Slicer self-test SKIPPED: SLICER_EXECUTABLE is not set (set it to a 3D Slicer executable to run RigidResNetRegistrationTest)."
  exit 0
fi
if [ ! -x "$SLICER_EXECUTABLE" ]; then
  echo "error: SLICER_EXECUTABLE=$SLICER_EXECUTABLE is not an executable file" >&2
  exit 2
fi

MODULE_DIR="$PWD/RigidResNetRegistration"
# The same as Slicer's ctest (slicer.testing.runUnitTest), with the exit code passed back.
read -r -d '' CODE <<'PYTHON'
import sys, unittest
import slicer
sys.path.insert(0, "@MODULE_DIR@")
status = 1
try:
    suite = unittest.TestLoader().loadTestsFromName("RigidResNetRegistration")
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    status = 0 if result.wasSuccessful() and result.testsRun > 0 else 1
finally:
    print("Slicer self-test " + ("PASSED" if status == 0 else "FAILED") + ": RigidResNetRegistrationTest")
    sys.stdout.flush()
    slicer.util.exit(status)
PYTHON
CODE="${CODE//@MODULE_DIR@/$MODULE_DIR}"

echo "Running RigidResNetRegistrationTest in $SLICER_EXECUTABLE"
timeout "${SLICER_SELFTEST_TIMEOUT:-1800}" "$SLICER_EXECUTABLE" --testing --no-splash --no-main-window --disable-cli-modules \
  --additional-module-paths "$MODULE_DIR" --python-code "$CODE"
code=$?
if [ "$code" -eq 124 ]; then
  echo "Slicer self-test FAILED: timed out after ${SLICER_SELFTEST_TIMEOUT:-1800} s" >&2
fi
exit "$code"
