# Sourced by train.sbatch and sweep.sbatch (after they set SCRIPT and ROOT): node settings,
# running a job step so that signals reach it, and the requeue decision from the run's marker.

fail() { echo "$SCRIPT: error: $*" >&2; exit 2; }

# The job, as scontrol names it: an array task is <array job id>_<task id>.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    JOB_REF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
    JOB_REF=$SLURM_JOB_ID
fi
MAX_REQUEUES=${NOA_MAX_REQUEUES:-20}

node_settings() {  # $1: processes per node
    export HDF5_USE_FILE_LOCKING=FALSE  # HDF5 on network file systems (Lustre, NFS)
    local threads=$(( ${SLURM_CPUS_PER_TASK:-1} / $1 ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}  # else accelerate sets 1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead rank fails the job instead of hanging NCCL
    # torch's elastic agent (inside accelerate launch) handles only TERM/INT/HUP/QUIT by default;
    # a USR1 would kill it at once. Told to, it forwards these to the ranks and waits for them.
    export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2
    export PET_SHUTDOWN_TIMEOUT=${NOA_SHUTDOWN_TIMEOUT:-600}
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$PET_SHUTDOWN_TIMEOUT
}

# A signal to the batch shell alone (`scancel --batch`, some preemptions) goes on to the job
# steps. SIGTERM goes on as USR2 (same meaning here): `scancel --signal=TERM` cancels the job.
_forward() {
    local sig=$1
    [ "$sig" = TERM ] && sig=USR2
    echo "$SCRIPT: $1 received: asking the ranks to save and stop (SIG$sig to the job steps)"
    scancel --signal="$sig" "$SLURM_JOB_ID" 2>/dev/null || kill -s "$sig" "$STEP_PID" 2>/dev/null
}

run_step() {  # srun arguments...; sets STEP_STATUS
    STARTED=$(mktemp)  # markers older than this are an earlier job's
    trap 'rm -f "$STARTED"' EXIT
    srun "$@" &
    STEP_PID=$!
    for sig in USR1 USR2 TERM; do trap "_forward $sig" "$sig"; done
    # `wait` returns early when a trapped signal arrives: wait until srun has really ended.
    while :; do
        wait "$STEP_PID"
        STEP_STATUS=$?
        kill -0 "$STEP_PID" 2>/dev/null || break
    done
    trap - USR1 USR2 TERM
}

_newer() { [ -f "$1" ] && [ "$1" -nt "$STARTED" ]; }

finish_or_requeue() {  # $1: the run folder; exits
    if _newer "$1/FINISHED"; then
        echo "$SCRIPT: run finished: $1/FINISHED"
        exit 0
    elif _newer "$1/STOPPED"; then
        echo "$SCRIPT: run stopped and saved: $(cat "$1/STOPPED")"
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
            echo "$SCRIPT: not requeued: $MAX_REQUEUES restarts reached (NOA_MAX_REQUEUES)"
            exit 1
        fi
        echo "$SCRIPT: requeueing job $JOB_REF; it resumes from the checkpoint"
        # After a preemption or `scontrol requeue` SLURM is requeueing it already: that is fine.
        scontrol requeue "$JOB_REF" || echo "$SCRIPT: (SLURM requeues it already)"
        exit 0
    fi
    echo "$SCRIPT: training failed (exit $STEP_STATUS, no STOPPED/FINISHED marker in $1):" \
        "not requeued; fix the error above, then resubmit the same way to resume" >&2
    exit "$(( STEP_STATUS > 0 ? STEP_STATUS : 1 ))"
}
