#!/bin/bash
# A test QUBES_RPC_DIR/admin.vm.volume.ImportWithSize that leaves what Qubes' own script
# (qubes-core-admin qubes-rpc/admin.vm.volume.Import) would leave when it is stopped: that script keeps
# qubesd's replies in a `mktemp` file under $TMPDIR, removed by an EXIT trap, and copies its input with a
# foreground `dd`.  Here the foreground child is the simulated import service (FAKE_SIM_IMPORT, run with
# FAKE_PYTHON): it reads stdin, talks to qubesd (ImportBegin/ImportEnd) and prints qubesd's reply.
#
# Stopped by closing its stdin, the child ends the import with ImportEnd fail and the script exits
# normally; stopped with SIGTERM, bash runs the EXIT trap; only SIGKILL leaves the temporary file.
# Each event is one line in FAKE_IMPORT_TRACE: "start VM VOLUME", "TERM VM VOLUME", "exit VM VOLUME RC".
set -euo pipefail
tmpfile=$(mktemp)
trap 'rm -f -- "$tmpfile"' EXIT
trap 'echo "TERM $QREXEC_REQUESTED_TARGET $1" >> "$FAKE_IMPORT_TRACE"; exit 143' TERM
echo "start $QREXEC_REQUESTED_TARGET $1" >> "$FAKE_IMPORT_TRACE"
rc=0
"$FAKE_PYTHON" "$FAKE_SIM_IMPORT" "$1" > "$tmpfile" || rc=$?
echo "exit $QREXEC_REQUESTED_TARGET $1 $rc" >> "$FAKE_IMPORT_TRACE"
cat -- "$tmpfile"
