# qubes-backup-dom0: `qvm-backup` and `qvm-backup-restore` are qubes-backup's (/usr/lib/qubes-backup/bin, which
# holds nothing else); Qubes' own stay where their package put them, /usr/bin/qvm-backup and
# /usr/bin/qvm-backup-restore.  Removing qubes-backup-dom0 removes this file: new shells find Qubes' own again.
if [ -x /usr/lib/qubes-backup/bin/qvm-backup ]; then
    case ":${PATH}:" in
        *:/usr/lib/qubes-backup/bin:*) ;;
        *) PATH="/usr/lib/qubes-backup/bin${PATH:+:${PATH}}"; export PATH ;;
    esac
fi
