#!/bin/sh
# enter.sh VIEW COMMAND...: run COMMAND with /usr/sbin as a stock droplet image has it (VIEW/sbin: every command
# of this machine but those the test hides, and a pretend apt-get). Runs inside `ip netns exec`, whose mount
# namespace is the command's own (mounts made here leave the machine's /usr/sbin alone).
set -eu
view=$1
shift
mount --bind /usr/sbin "$view/real"
mount --bind "$view/sbin" /usr/sbin
exec "$@"
