#!/bin/sh
# `make test`: the suite in two phases, so it fits in about a quarter of an hour on 2 cores.
#   1. everything but the fault-injection suite, spread over TEST_WORKERS processes
#      (pytest-xdist): most of it waits on brokers, subprocesses and sockets, not on the CPU;
#   2. the fault-injection suite (marker `faults`) alone: its bounds (gaps, latency ratios,
#      RSS) assume the machine is not also running other tests.
# Arguments go to pytest in both phases. Arguments that choose a marker (-m) run one phase,
# as given. Exit status: the first failing phase's; a phase that selects nothing (pytest's 5,
# e.g. a file of the other phase was named) is not a failure unless both select nothing.
set -u
python=$1
shift
workers=${TEST_WORKERS:-2}
case " $* " in
*" -m "* | *" -m="*)
    exec "$python" -m pytest -n "$workers" "$@"
    ;;
esac
"$python" -m pytest -m "not faults" -n "$workers" "$@"
first=$?
"$python" -m pytest -m faults "$@"
second=$?
if [ "$first" -eq 5 ] && [ "$second" -eq 5 ]; then
    exit 5
fi
for status in "$first" "$second"; do
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
        exit "$status"
    fi
done
exit 0
