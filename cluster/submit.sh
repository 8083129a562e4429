#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray job.
#
#   cluster/submit.sh [--address URL] [--no-wait] CONFIG [key=value ...]
#
# The repository (without .venv, outputs, models and .git) is shipped as the job's working
# directory, so CONFIG and every relative path in it are read from the repository root.
set -euo pipefail

usage() {
    cat <<EOF
usage: cluster/submit.sh [--address URL] [--no-wait] CONFIG [key=value ...]

  --address URL  Ray dashboard address (default: \$RAY_ADDRESS or http://127.0.0.1:8265)
  --no-wait      return after submitting instead of following the job's logs
  CONFIG         preset, relative to the repository root (e.g. conf/gpu_8x_example.yaml)
  key=value      config overrides, passed on to 'rayrlhf train'
EOF
}

die_usage() {
    echo "submit.sh: error: $1" >&2
    usage >&2
    exit 2
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
wait_for_job=true

while [[ $# -gt 0 ]]; do
    case $1 in
        --address)
            [[ $# -ge 2 ]] || die_usage "--address needs a value"
            address=$2
            shift 2
            ;;
        --address=*)
            address=${1#--address=}
            shift
            ;;
        --no-wait)
            wait_for_job=false
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            die_usage "unknown option '$1'"
            ;;
        *)
            break
            ;;
    esac
done

[[ $# -ge 1 ]] || die_usage "missing CONFIG"
config=$1
shift
# The job runs in the shipped copy of the repository: a relative CONFIG must be inside it.
if [[ $config != /* && ! -f $repo_root/$config ]]; then
    die_usage "config '$config' not found under $repo_root"
fi

command -v ray >/dev/null || { echo "submit.sh: error: 'ray' is not on PATH" >&2; exit 1; }

# `ray start` turns token authentication on when a token exists, but the job CLI only sends
# the token with RAY_AUTH_MODE=token. A token sent to a cluster without authentication is ignored.
if [[ -z ${RAY_AUTH_MODE:-} ]] &&
    [[ -n ${RAY_AUTH_TOKEN:-} || -n ${RAY_AUTH_TOKEN_PATH:-} || -f ${HOME:-}/.ray/auth_token ]]; then
    export RAY_AUTH_MODE=token
fi

job_id="rayrlhf-$(date -u +%Y%m%d-%H%M%S)-$(printf '%04x%04x' "$RANDOM" "$RANDOM")"
excludes='{"excludes": ["/.venv/", "/outputs/", "/models/", "/.git/", "__pycache__/", "/.pytest_cache/", "/.ruff_cache/"]}'
submit=(ray job submit --address "$address" --submission-id "$job_id"
        --working-dir "$repo_root" --runtime-env-json "$excludes")

echo "job id: $job_id"
if [[ $wait_for_job == false ]]; then
    "${submit[@]}" --no-wait -- python -m rayrlhf.cli train --config "$config" ray.address=auto "$@"
    echo "follow its logs: ray job logs -f $job_id --address $address"
    echo "its status:      ray job status $job_id --address $address"
else
    # Follows the logs until the job ends and exits non-zero if it failed.
    exec "${submit[@]}" -- python -m rayrlhf.cli train --config "$config" ray.address=auto "$@"
fi
