"""Where `fusedtrain build` puts the extension it compiles for the running torch, and where the
import looks for it: <root>/<key>/_C.so (docs/design.md §3, "Install and loading").

root: $FUSEDTRAIN_CACHE, else $XDG_CACHE_HOME/fusedtrain, else ~/.cache/fusedtrain.
key: the torch version, CUDA, Python and fusedtrain version in readable form, then a hash of the
torch's whole record and of the sources, so that one cache serves several torches and versions
side by side and a build is never found for another torch or other sources.
"""
import hashlib
import os
import platform
import re
import sys
import sysconfig

from fusedtrain import _build_spec


def root():
    """The cache's root directory (it may not exist yet)."""
    if os.environ.get("FUSEDTRAIN_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["FUSEDTRAIN_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusedtrain")


def key(torch, csrc, version):
    """The entry's name for a build of the sources in `csrc` (fusedtrain `version`) against `torch`."""
    # the extension suffix tells free-threaded and debug Pythons apart (X.Y does not), the machine
    # x86 from aarch64 on a shared home
    abi = f"{sysconfig.get_config_var('EXT_SUFFIX')};{platform.machine()}"
    exact = hashlib.sha256("\n".join([_build_spec.torch_record(torch), abi, _build_spec.sources_digest(csrc)]).encode())
    readable = (f"torch{torch.__version__}-cuda{torch.version.cuda or 'none'}"
                f"-py{sys.version_info[0]}{sys.version_info[1]}-fusedtrain{version}")
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", readable) + "-" + exact.hexdigest()[:16]


def entry(torch, csrc, version):
    """The directory of the build of `csrc` for `torch` (exists once built)."""
    return os.path.join(root(), key(torch, csrc, version))


def so_path(entry_dir):
    """The extension's file in an entry: what torch.utils.cpp_extension.load names it."""
    return os.path.join(entry_dir, _build_spec.MODULE_NAME + ".so")
