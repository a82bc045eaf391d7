# CPU over a window, per process and per core: cpuwin.py DELAY SECS NAME=PID... (used by
# bench/brokers.sh and bench/cards.sh): per-thread ticks and the core each thread ran on, the
# pressure-stall shares of the window, the cores' iowait and RabbitMQ WAL rollovers.
import glob, os, sys, time
delay, secs = float(sys.argv[1]), float(sys.argv[2])
procs = [a.split("=", 1) for a in sys.argv[3:]]
hz = os.sysconf("SC_CLK_TCK")
def cores():
    out = {}
    for line in open("/proc/stat"):
        if line.startswith("cpu") and line[3].isdigit():
            f = line.split(); v = list(map(int, f[1:]))
            out[int(f[0][3:])] = (sum(v) - v[3] - v[4], sum(v))
    return out
def threads(pid):
    out = {}
    for path in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            rest = open(path).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[path] = (int(rest[11]) + int(rest[12]), int(rest[36]))
    return out
def psi(kind):
    try:
        for line in open(f"/proc/pressure/{kind}"):
            if line.startswith("some"):
                return int(line.split("total=")[1])
    except OSError:
        return None
def iowait():
    v = open("/proc/stat").readline().split()[1:]
    return int(v[4]), sum(map(int, v))
WAL = "/var/lib/rabbitmq/mnesia/rabbit@localhost/quorum/rabbit@localhost"
def wal():
    try:
        return sorted(f for f in os.listdir(WAL) if f.endswith(".wal"))
    except OSError:
        return None
time.sleep(delay)
p0, w0, io0, wal0 = psi("cpu"), psi("io"), iowait(), wal()
c0, last = cores(), {name: threads(pid) for name, pid in procs}
used = {name: {} for name, _ in procs}
end = time.time() + secs
while time.time() < end:
    time.sleep(0.1)
    for name, pid in procs:
        now = threads(pid)
        for t, (ticks, cpu) in now.items():
            d = ticks - last[name].get(t, (ticks, cpu))[0]
            if d:
                used[name][cpu] = used[name].get(cpu, 0) + d
        last[name] = now
c1 = cores()
p1, w1, io1, wal1 = psi("cpu"), psi("io"), iowait(), wal()
total = {c: c1[c][1] - c0[c][1] for c in c1}
busy = {c: c1[c][0] - c0[c][0] for c in c1}
ours = sum(sum(u.values()) for u in used.values())
parts = []
for name, _ in procs:
    u = used[name]; s = sum(u.values())
    where = " + ".join(f"core{c} {u[c] / hz / secs:.2f}" for c in sorted(u)) or "idle"
    parts.append(f"{name} {s / hz / secs:.2f} ({where})")
print("   CPU, cores busy over the window: " + ", ".join(parts)
      + f"; others {max(0, sum(busy.values()) - ours) / hz / secs:.2f}; "
      + ", ".join(f"core{c} {100 * busy[c] / max(total[c], 1):.0f}% busy" for c in sorted(busy)))
stall = []
if p0 is not None and p1 is not None:
    stall.append(f"a task waiting for a CPU {100 * (p1 - p0) / 1e6 / secs:.0f}% of the time")
if w0 is not None and w1 is not None:
    stall.append(f"waiting for I/O {100 * (w1 - w0) / 1e6 / secs:.0f}%")
stall.append(f"iowait {100 * (io1[0] - io0[0]) / max(1, io1[1] - io0[1]):.0f}%")
if wal0 is not None and wal1 is not None and wal0 != wal1:
    stall.append("RabbitMQ rolled its quorum WAL over during the window (segment-writing burst)")
print("   contention: " + ", ".join(stall))
