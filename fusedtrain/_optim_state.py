"""The `state` of the fused optimizers: torch's `defaultdict(dict)` of per-param dicts, with
one difference: every assignment or removal, in the outer map or in a param's dict, counts
in a version number. FusedAdam caches its launch plans (the lists of state tensors handed
to the kernel) until that number changes, so a state tensor replaced by hand, as in

    for st in opt.state.values():
        for k, v in st.items():
            st[k] = v.to(device)

is the one the next step updates (with a plain dict it would update the old one, and the
state a checkpoint saves would go stale). In-place writes (`st["exp_avg"].zero_()`) need
no tracking: the plan holds the same tensor.

`FusedAdam.state_dict()` hands out plain dicts, so checkpoints hold only builtin types and
load with `torch.load(weights_only=True)` and without fusedtrain."""
import collections


class Version:
    """A counter shared by an optimizer's state map and all its per-param dicts."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def bump(self):
        self.n += 1


class _CountsRemovals:
    """The removing methods of a dict, each counted in self._version (the setting ones differ
    between the two classes below)."""

    __slots__ = ()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._version.bump()

    def __ior__(self, other):
        self.update(other)
        return self

    def pop(self, *args):
        self._version.bump()
        return super().pop(*args)

    def popitem(self):
        self._version.bump()
        return super().popitem()

    def clear(self):
        self._version.bump()
        super().clear()


class ParamState(_CountsRemovals, dict):
    """One param's state: a dict that counts its assignments and removals."""

    __slots__ = ("_version",)

    def __init__(self, version, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._version = version

    def __reduce__(self):
        return (ParamState, (self._version, dict(self)))

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._version.bump()

    def update(self, *args, **kwargs):
        self._version.bump()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._version.bump()
        return super().setdefault(key, default)


class _NewParamState:
    """StateMap's default_factory (a class, not a lambda, so that the map pickles)."""

    __slots__ = ("version",)

    def __init__(self, version):
        self.version = version

    def __call__(self):
        return ParamState(self.version)


class StateMap(_CountsRemovals, collections.defaultdict):
    """param -> ParamState; a plain dict stored in it becomes a ParamState."""

    def __init__(self, version, items=()):
        super().__init__(_NewParamState(version))
        self._version = version
        for k, v in dict(items).items():
            self[k] = v

    def __reduce__(self):
        return (StateMap, (self._version, dict(self)))

    def __copy__(self):
        return StateMap(self._version, self)

    def _wrap(self, value):
        if isinstance(value, ParamState) and value._version is self._version:
            return value
        return ParamState(self._version, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, self._wrap(value))
        self._version.bump()

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]
