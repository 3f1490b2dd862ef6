#!/bin/bash
# Runs inside the guest: the one command virtme-ng executes.
#
#     /bin/bash launcher.sh WORKDIR
#
# WORKDIR (in the shared directory, written by the host, see boot.py) holds
# argv.nul and env.nul (the command and its environment additions,
# NUL-separated: no shell string is ever built from them), cwd, and
# mounts.tsv (tag<TAB>path of the host's Python directories exported again).
# It is bash, not Python: under TCG a Python start costs 2-10 s here.
#
# Written back, as it happens (the host sees the shared directory live):
#   started      the guest reached user space (boot is over)
#   facts.json   kernel release, CPU model ("QEMU TCG CPU ..." under TCG), KSM sysfs present
#   stdout, stderr   the command's output
#   exit         the command's exit status (also vng's, when udev works)
w="$1"
: > "$w/launcher.log"

# The root 9p mount has no cache: every stat()/open() of a Python import is a
# round trip to QEMU (50 ms each on a loaded host).  The Python directories do
# not change during a run, so they are mounted again over the same paths with
# cache=loose.  A failure only costs speed.
while IFS=$'\t' read -r tag path; do
    [ -n "$tag" ] || continue
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 "$tag" "$path" \
        2>>"$w/launcher.log" || echo "cached mount of $path failed" >>"$w/launcher.log"
done < "$w/mounts.tsv"

date +%s.%N > "$w/started"
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1 | tr -d '"\\')
if [ -d /sys/kernel/mm/ksm ]; then ksm=true; else ksm=false; fi
printf '{"kernel_release": "%s", "cpu_model": "%s", "ksm_sysfs": %s}\n' \
    "$(uname -r)" "$cpu" "$ksm" > "$w/facts.json"

mapfile -d '' -t cmd < "$w/argv.nul"
mapfile -d '' -t envs < "$w/env.nul"
cd "$(cat "$w/cwd")" 2>/dev/null || cd /
env "${envs[@]}" "${cmd[@]}" < /dev/null > "$w/stdout" 2> "$w/stderr"
code=$?
echo "$code" > "$w/exit"
sync
exit "$code"
