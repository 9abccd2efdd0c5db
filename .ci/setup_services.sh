#!/usr/bin/env bash
# Launch services for `make test-cluster`: Open MPI, a throwaway SLURM cluster on loopback, and
# passwordless ssh to two loopback "nodes" for DeepSpeed's default launcher, pdsh.
#
# Installs Debian's slurmctld, slurmd, slurm-client, munge, openmpi-bin, libopenmpi-dev, pdsh,
# openssh-server and openssh-client when one is missing (root: CI's fresh container, or a
# disposable dev container), writes a slurm.conf for two nodes n1 and n2 that are both this host
# (two slurmd daemons, `slurmd -N`, each on its own port; node address 127.0.0.1), starts munged,
# slurmctld and both slurmd, and waits until `sinfo` shows both nodes idle. No systemd: the
# daemons are started directly.
#
# Idempotent: a second run with the daemons up and the same config only checks `sinfo` (about a
# second). It refuses to overwrite a slurm.conf it did not write, so it cannot clobber a real
# cluster's. Everything the cluster keeps (state, spools, logs, pid files) lives in $STATE.
#
# The cluster: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups, which
# containers rarely delegate), no accounting (scontrol shows the jobs), JobRequeue=1 and short
# timers so that requeue and node checks take seconds, not minutes.
#
# pdsh: an sshd of its own (not the system's, not port 22) on 127.0.0.1:$SSH_PORT with its own
# host key, taking root's login only with a key generated in $STATE/ssh. The nodes glm-pdsh-node1
# and glm-pdsh-node2 (/etc/hosts: 127.0.0.1) reach it through a Host block in
# /etc/ssh/ssh_config.d/ (port, that key, the host key pinned in $STATE/ssh/known_hosts), so
# `ssh glm-pdsh-node1` and `pdsh -R ssh -w 'glm-pdsh-node[1-2]' hostname` work as on a cluster.
# A changed sshd config restarts that sshd; a second run only checks `ssh glm-pdsh-node1 true`.
set -euo pipefail

CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
STATE=${MEGATRON_GLM_SLURM_STATE:-/var/spool/megatron_glm_slurm}
MARK="# megatron_glm throwaway test cluster, written by .ci/setup_services.sh"
PACKAGES=(slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev pdsh openssh-server
    openssh-client)
NODES=(n1 n2)
SSH_NODES=(glm-pdsh-node1 glm-pdsh-node2)
SSH_PORT=${MEGATRON_GLM_SSH_PORT:-17022}
SSH_CLIENT_CONF=/etc/ssh/ssh_config.d/megatron_glm_pdsh.conf

log() { echo "setup_services: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "not root: cannot install ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# install_conf PATH TMP: move the temporary file TMP to PATH; status 1 when PATH already held it.
install_conf() {
    local path=$1 tmp=$2
    if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        return 1
    fi
    if [ -f "$path" ] && ! head -n 1 "$path" | grep -qxF "$MARK"; then
        rm -f "$tmp"
        die "$path exists and was not written by this script; not overwriting it"
    fi
    mkdir -p "$(dirname "$path")"
    mv "$tmp" "$path"
    chmod 644 "$path"
    log "wrote $path"
}

write_conf() {
    local host cpus tmp changed=1
    host=$(hostname -s)
    cpus=$(nproc)
    [ "$cpus" -ge 2 ] || cpus=2 # two tasks per node (a "GPU" each) even on a one-core runner
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARK
ClusterName=megatron_glm_test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials live 10 s (default 120): SLURM holds a requeued job that long plus one second.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
SlurmdTimeout=60
InactiveLimit=0
MessageTimeout=20
SchedulerParameters=sched_interval=2
# Two "GPUs" per node (gres.conf below), so that --gpus-per-node allocates and sets SLURM_GPUS_*
# like a GPU cluster; the ranks still run on CPU.
GresTypes=gpu
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus Gres=gpu:2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    install_conf "$CONF" "$tmp" && changed=0
    # The two "GPUs" of each node are /dev/null and /dev/zero: slurmd counts a GPU only with a
    # device file. SLURM sets CUDA_VISIBLE_DEVICES=0,1; the CPU ranks ignore it.
    tmp=$(mktemp)
    printf '%s\nNodeName=n[1-2] Name=gpu File=/dev/null\nNodeName=n[1-2] Name=gpu File=/dev/zero\n' \
        "$MARK" >"$tmp"
    install_conf "$(dirname "$CONF")/gres.conf" "$tmp" && changed=0
    return $changed
}

# The node names resolve to the nodes' address, as on a real cluster: ranks that take the master
# from SLURM_JOB_NODELIST (plain srun, deepspeed --launcher slurm) connect to "n1", and a pdsh
# launch can name "glm-pdsh-node1" as its master.
add_hosts() {
    local node
    for node in "${NODES[@]}" "${SSH_NODES[@]}"; do
        getent hosts "$node" >/dev/null || echo "127.0.0.1 $node # megatron_glm test cluster" >>/etc/hosts
    done
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start_munge() {
    [ -f /etc/munge/munge.key ] || {
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    }
    install -d -o munge -g munge -m 755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged
    fi
}

stop_slurm() {
    local pidfile
    for pidfile in "$STATE"/slurmctld.pid "$STATE"/slurmd-*.pid; do
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")"
            while alive "$pidfile"; do sleep 0.2; done
        fi
    done
}

start_slurm() {
    mkdir -p "$STATE/ctld"
    if ! alive "$STATE/slurmctld.pid"; then
        log "starting slurmctld"
        # -i: ignore state files of another config (a cluster is throwaway, jobs are not kept).
        /usr/sbin/slurmctld -i
    fi
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE/slurmd-$node"
        if ! alive "$STATE/slurmd-$node.pid"; then
            log "starting slurmd -N $node"
            /usr/sbin/slurmd -N "$node"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + 60)) states
    while :; do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        [ "$states" = "n1 idle n2 idle " ] && break
        if [ $SECONDS -ge $deadline ]; then
            die "nodes not idle after 60 s (sinfo: '${states}'); logs in $STATE"
        fi
        # A node that registered before the controller knew it is resumed once.
        for node in "${NODES[@]}"; do
            if sinfo -h -N -n "$node" -o '%t' 2>/dev/null | grep -Eq 'down|drain'; then
                scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
            fi
        done
        sleep 1
    done
    log "SLURM cluster up: $(sinfo -h -o '%P %D %t %N' | tr '\n' ' ')"
}

# ssh_keys DIR: the sshd's host key and root's login key (kept across runs: known_hosts pins it).
ssh_keys() {
    local dir=$1 key
    for key in host_ed25519 id_ed25519; do
        [ -f "$dir/$key" ] ||
            ssh-keygen -q -t ed25519 -N '' -C "megatron_glm test $key" -f "$dir/$key"
    done
}

# write_sshd_conf DIR: the test sshd's config and authorized key; status 0 when one changed.
write_sshd_conf() {
    local dir=$1 tmp changed=1
    tmp=$(mktemp)
    { echo "$MARK"; cat "$dir/id_ed25519.pub"; } >"$tmp"
    install_conf "$dir/authorized_keys" "$tmp" && changed=0
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARK
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
PidFile $STATE/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
AllowUsers root
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
EOF
    install_conf "$dir/sshd_config" "$tmp" && changed=0
    return $changed
}

# write_ssh_client_conf DIR: the nodes' Host block for every ssh client (pdsh runs ssh), with
# the test sshd's host key pinned.
write_ssh_client_conf() {
    local dir=$1 tmp
    tmp=$(mktemp)
    { echo "$MARK"; echo "glm-pdsh-node $(cut -d' ' -f1-2 "$dir/host_ed25519.pub")"; } >"$tmp"
    install_conf "$dir/known_hosts" "$tmp" || true
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARK
# Root's key login to the loopback sshd of the cluster tests (pdsh's "nodes").
Host ${SSH_NODES[*]}
    HostName 127.0.0.1
    Port $SSH_PORT
    User root
    IdentityFile $dir/id_ed25519
    IdentitiesOnly yes
    BatchMode yes
    HostKeyAlias glm-pdsh-node
    UserKnownHostsFile $dir/known_hosts
    StrictHostKeyChecking yes
EOF
    install_conf "$SSH_CLIENT_CONF" "$tmp" || true
}

start_sshd() {
    local dir=$STATE/ssh
    mkdir -p "$dir"
    chmod 700 "$dir"
    ssh_keys "$dir"
    if write_sshd_conf "$dir" && alive "$STATE/sshd.pid"; then
        kill "$(cat "$STATE/sshd.pid")" # the sshd of an older config
        while alive "$STATE/sshd.pid"; do sleep 0.2; done
    fi
    write_ssh_client_conf "$dir"
    if ! alive "$STATE/sshd.pid"; then
        log "starting sshd on 127.0.0.1:$SSH_PORT"
        mkdir -p /run/sshd # its privilege separation directory
        /usr/sbin/sshd -f "$dir/sshd_config" -E "$STATE/sshd.log"
    fi
    ssh "${SSH_NODES[0]}" true || die "ssh ${SSH_NODES[0]} failed; sshd log in $STATE/sshd.log"
    log "sshd up: ssh ${SSH_NODES[*]} (127.0.0.1:$SSH_PORT) as root"
}

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"
install_packages
mkdir -p "$STATE"
if write_conf; then
    stop_slurm # daemons of an older config
fi
add_hosts
start_munge
start_slurm
start_sshd
wait_idle
