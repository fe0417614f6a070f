"""Error kinds. Schedulers must tell a user's mistake from a broken node, so every error says which."""


class VmwrapError(Exception):
    """Base: a message fit to show to the person who caused or must fix it."""

    kind = "error"


class UserError(VmwrapError):
    """The job asked for something wrong (bad directive, unknown image, no right). Fail the job, keep the node."""

    kind = "user"


class NotReadyError(UserError):
    """The job's VM cannot take this request yet (it is still starting): the caller asks again shortly."""


class BusyError(UserError):
    """What the request needs is taken by others for now (the VM's shell port, the node agent's slots):
    a caller that can wait asks again shortly."""


class ImageError(VmwrapError):
    """The site's image is unusable (checksum mismatch, unreachable source). Fail the job, keep the node."""

    kind = "image"


class NodeError(VmwrapError):
    """This node cannot run VMs now (libvirtd down, cache disk full). A scheduler should drain the node."""

    kind = "node"


class CacheFullError(NodeError):
    """The image cache cannot make room because running or suspended jobs pin what is there.

    A passing condition of a healthy node: fail (or requeue) the job, do not drain the node."""


class CheckpointError(VmwrapError):
    """The job's checkpoint is missing or damaged: its --on-lost-checkpoint policy decides."""

    kind = "checkpoint"


class JobDiskError(CacheFullError):
    """No space (ENOSPC/EDQUOT) for the job's run dir, overlay or control files while preparing it.

    Usually other jobs' files fill the disk for a while: like CacheFullError, fail the job with the
    reason and keep the node up (a prolog that exits 1 would drain it for what users wrote)."""


class GuestStalledError(VmwrapError):
    """The job's QEMU stopped answering a root libvirt call (its user can SIGSTOP it: it runs as them).

    The VM was destroyed so the call returned: fail the job, never the node (a hung prolog or
    epilog would drain it for what a user did)."""

    kind = "stalled"
