# PBS Professional / OpenPBS mom hook (one hook for the events execjob_begin, execjob_launch,
# execjob_preterm, execjob_end, execjob_abort, execjob_postsuspend, execjob_preresume; `vmwrap config render pbs`
# prints the qmgr commands). pbs_mom runs it as root in its own Python: it only copies the event's
# facts, hands them as JSON to vmwrap (vmwrap_plugins/pbs/mom.py) in an isolated Python with an empty
# environment, and applies the reply. Only the documented `pbs` hook API is used (Hooks Guide; the
# OpenPBS module src/modules/python/pbs/v1/_svr_types.py).
import json
import subprocess

import pbs

PYTHON = "/opt/vmwrap/venv/bin/python"
# The hook's configuration file (`qmgr import hook ... application/x-config`), if any, names the
# vmwrap settings file: {"config": "/etc/vmwrap/vmwrap.toml"}.
CONFIG_MAX = 4096
REPLY_MAX = 1 << 16

e = pbs.event()
EVENTS = {pbs.EXECJOB_BEGIN: "begin", pbs.EXECJOB_LAUNCH: "launch", pbs.EXECJOB_PRETERM: "preterm",
          pbs.EXECJOB_END: "end",
          pbs.EXECJOB_ABORT: "abort", pbs.EXECJOB_POSTSUSPEND: "postsuspend",
          pbs.EXECJOB_PRERESUME: "preresume"}
event = EVENTS.get(e.type)
if event is None:
    e.accept()


def _config():
    path = getattr(pbs, "hook_config_filename", None)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(CONFIG_MAX)).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _value(mapping, key):
    try:
        v = mapping[key]
    except (KeyError, TypeError):
        return None
    return None if v is None else str(v)


def _attr(job, name):
    v = getattr(job, name, None)   # an unset job attribute reads as None
    return None if v is None else str(v)


j = e.job
facts = {"job": str(j.id), "ms": bool(j.in_ms_mom()), "node": str(pbs.get_local_nodename())}
if event in ("begin", "end"):
    facts.update(run_count=_attr(j, "run_count"), exit_status=_attr(j, "Exit_status"),
                 checkpointed=bool(j.is_checkpointed()))
if event == "begin":
    facts.update(euser=str(j.euser), egroup=str(j.egroup), exec_host=_attr(j, "exec_host"),
                 exec_vnode=_attr(j, "exec_vnode"), pbs_home=str(pbs.pbs_conf.get("PBS_MOM_HOME") or pbs.pbs_conf["PBS_HOME"]),
                 resources={k: _value(j.Resource_List, k) for k in ("ncpus", "mem", "vmwrap_image")},
                 variables={k: _value(j.Variable_List, k) for k in ("VMWRAP_IMAGE", "PBS_O_WORKDIR")})
if event == "launch":
    # The job's top shell (the primary host, first) or a TM task (pbs_tmrsh, pbsdsh: any host; argv the
    # spawned words) (start_exec.c finish_exec, start_process)
    facts.update(argv=[str(a)[:4096] for a in (e.argv or [])[:8]], pbs_exec=str(pbs.pbs_conf.get("PBS_EXEC") or ""))
config = _config()
argv = [PYTHON, "-I", "-m", "vmwrap_plugins.pbs"] + (["--config", str(config)] if config else []) + ["pbs", "mom", event]
try:
    r = subprocess.run(argv, input=json.dumps(facts).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env={}, cwd="/", timeout=3600)
    reply = json.loads(r.stdout[:REPLY_MAX].decode(errors="replace") or "{}")
    if r.returncode != 0 or not isinstance(reply, dict):
        raise ValueError("exit status %d: %s" % (r.returncode, r.stderr[-500:].decode(errors="replace")))
except Exception as x:  # vmwrap cannot run here: the node's fault, never the job's
    why = "vmwrap: %s failed: %s" % (argv[0], " ".join(str(x).split())[:400])
    reply = {"log": why}
    if event in ("begin", "launch"):
        reply.update(reject=why, offline=why)

if reply.get("log"):
    pbs.logjobmsg(str(j.id), str(reply["log"])[:1000])
if reply.get("offline"):
    node = e.vnode_list[pbs.get_local_nodename()]
    node.state = pbs.ND_OFFLINE
    node.comment = str(reply["offline"])[:500]
if event == "launch" and reply.get("progname"):
    e.progname = str(reply["progname"])
    e.argv = [str(a) for a in reply["argv"]]
if event == "launch" and reply.get("argv_from"):
    # a task of vmwrap's: its words from the reply's, then the spawned words after them, unchanged
    e.argv = [str(a) for a in reply["argv_from"]] + [str(a) for a in e.argv][int(reply["keep_after"]):]
if reply.get("reject"):
    if event == "launch" and reply.get("offline"):
        j.rerun()  # requeue, not delete, a job this node could not start
    e.reject(str(reply["reject"])[:1000])
e.accept()
