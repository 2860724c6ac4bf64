# qubes-backup-agent, for Qubes R4.2 templates (nothing happens on R4.3 or later).
# R4.2's qrexec-agent runs every service through /usr/lib/qubes/qubes-rpc-multiplexer, a login shell (so it reads
# this file) that looks for the service in $QREXEC_SERVICE_PATH, by default /usr/local/etc/qubes-rpc:/etc/qubes-rpc.
# R4.3 looks in /run/qubes-rpc first; it ships /usr/lib/tmpfiles.d/qrexec-volatile-config.conf (which creates
# /run/qubes-rpc) with that change.  Without it, give R4.2 R4.3's order, so qubes.Backup and qubes.Restore are
# the links /usr/lib/tmpfiles.d/qubes-backup-agent.conf made there.  Only while the package is installed (dpkg
# keeps this configuration file until purge).
if [ -z "${QREXEC_SERVICE_PATH+x}" ] && [ -x /usr/lib/qubes-backup/rpc-policy/qubes.Restore ] &&
   [ ! -e /usr/lib/tmpfiles.d/qrexec-volatile-config.conf ]; then
    QREXEC_SERVICE_PATH=/run/qubes-rpc:/usr/local/etc/qubes-rpc:/etc/qubes-rpc
    export QREXEC_SERVICE_PATH
fi
